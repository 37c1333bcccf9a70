// The console's only script: draws the charts whose data a page holds in a
// <script type="application/json">, and asks before a form marked data-confirm is sent.
// Loaded from /ui/static/ (the Content-Security-Policy allows no inline script).
(function () {
  "use strict";

  var COLOURS = ["#2563eb", "#d97706", "#059669", "#7c3aed"];

  function formatNumber(value) {
    return value == null ? "" : Number(value).toLocaleString("en-US");
  }

  function chartOptions(data, width) {
    var scales = {};
    var axes = [];
    var series = [{}];
    var scaleNames = [];
    data.series.forEach(function (entry) {
      if (scaleNames.indexOf(entry.scale) < 0) {
        scaleNames.push(entry.scale);
      }
    });
    if (data.kind === "bars") {
      scales.x = { time: false, range: [-0.5, data.x.length - 0.5] };
      axes.push({
        splits: function () { return data.x; },
        values: function (u, splits) {
          return splits.map(function (index) { return data.labels[index] || ""; });
        },
        rotate: data.x.length > 6 ? -45 : 0,
        size: data.x.length > 6 ? 90 : 40,
      });
      series[0] = {
        label: "Group",
        value: function (u, index) { return index == null ? "" : data.labels[index]; },
      };
    } else {
      axes.push({});
      series[0] = { label: "Day (UTC)", value: "{YYYY}-{MM}-{DD}" };
    }
    scaleNames.forEach(function (name, position) {
      scales[name] = { auto: true, range: function (u, min, max) { return [0, Math.max(1, max * 1.1)]; } };
      axes.push({
        scale: name,
        side: position === 0 ? 3 : 1,
        grid: { show: position === 0 },
        size: 70,
        values: function (u, splits) { return splits.map(formatNumber); },
        label: name,
      });
    });
    data.series.forEach(function (entry, index) {
      var colour = COLOURS[index % COLOURS.length];
      var options = {
        label: entry.label,
        scale: entry.scale,
        stroke: colour,
        width: 2,
        value: function (u, value) { return formatNumber(value); },
      };
      if (data.kind === "bars") {
        options.fill = colour;
        options.paths = uPlot.paths.bars({ size: [0.6, 80] });
        options.points = { show: false };
      }
      series.push(options);
    });
    return { width: width, height: 300, scales: scales, axes: axes, series: series };
  }

  function drawChart(area) {
    var source = document.getElementById(area.getAttribute("data-chart"));
    if (!source || typeof uPlot === "undefined") {
      return;
    }
    var data = JSON.parse(source.textContent);
    var columns = [data.x].concat(data.series.map(function (entry) { return entry.values; }));
    var width = Math.max(280, area.clientWidth);
    var plot = new uPlot(chartOptions(data, width), columns, area);
    var pending = null;
    window.addEventListener("resize", function () {
      window.clearTimeout(pending);
      pending = window.setTimeout(function () {
        plot.setSize({ width: Math.max(280, area.clientWidth), height: 300 });
      }, 100);
    });
  }

  function confirmForms() {
    document.querySelectorAll("form[data-confirm]").forEach(function (form) {
      form.addEventListener("submit", function (event) {
        if (!window.confirm(form.getAttribute("data-confirm"))) {
          event.preventDefault();
        }
      });
    });
  }

  function selectIssuedKey() {
    var field = document.getElementById("new-key");
    if (field) {
      field.addEventListener("focus", function () { field.select(); });
    }
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-chart]").forEach(drawChart);
    confirmForms();
    selectIssuedKey();
  });
})();
