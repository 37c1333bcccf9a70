# The project's virtualenv (.venv at the repo root), shared by scripts/test and
# scripts/serve. Sourced, not run.

# shellcheck source-path=SCRIPTDIR source=system.sh
. "$(dirname "${BASH_SOURCE[0]}")/system.sh"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV_DIR="$REPO_ROOT/.venv"
VENV_PY="$VENV_DIR/bin/python"

# Creates .venv when it is missing or unusable.
ensure_venv() {
  # A venv without pip is what a failed 'python3 -m venv' leaves behind on
  # Debian; treat it as missing so that it is made again.
  if [ -x "$VENV_PY" ] && [ -x "$VENV_DIR/bin/pip" ]; then
    return 0
  fi
  rm -rf "$VENV_DIR"
  if ! command -v python3 >/dev/null 2>&1; then
    apt_install python3 python3-venv
  fi
  echo "creating $VENV_DIR" >&2
  if ! python3 -m venv "$VENV_DIR"; then
    # Debian ships venv's ensurepip in a separate package, missing on a fresh machine.
    rm -rf "$VENV_DIR"
    apt_install python3-venv
    python3 -m venv "$VENV_DIR"
  fi
}

# ensure_installed SPEC STAMP_PREFIX: pip-installs the project (editable) as SPEC,
# e.g. '.[test]'. A stamp named after pyproject.toml's sha256 skips the install on
# reruns until pyproject.toml changes (the stamp lives in .venv, so a new venv
# installs again).
ensure_installed() {
  local spec="$1" stamp_prefix="$2" hash stamp
  if [ ! -f "$REPO_ROOT/pyproject.toml" ]; then
    echo "error: no pyproject.toml in $REPO_ROOT" >&2
    return 1
  fi
  hash="$(sha256sum "$REPO_ROOT/pyproject.toml" | cut -d ' ' -f 1)"
  stamp="$VENV_DIR/.installed-${stamp_prefix}${hash}"
  if [ -f "$stamp" ]; then
    return 0
  fi
  # Not quiet: a first install takes a minute or more, and pip's lines show it moving.
  echo "installing $spec into $VENV_DIR (once per change of pyproject.toml)" >&2
  (cd "$REPO_ROOT" && "$VENV_DIR/bin/pip" install --disable-pip-version-check -e "$spec")
  touch "$stamp"
}

# Points tiktoken at the pre-filled encoding cache in shared/, because the test
# machines have no network to download encodings from.
export_tiktoken_cache() {
  local cache="$REPO_ROOT/../shared/tiktoken-cache"
  if [ -d "$cache" ]; then
    TIKTOKEN_CACHE_DIR="$(cd "$cache" && pwd)"
    export TIKTOKEN_CACHE_DIR
  fi
}
