-- wrk script: POSTs one chat completion body again and again, rotating through the keys.
-- Arguments (after wrk's `--`): PATH BODY_FILE KEYS_FILE
--   PATH       the request path, e.g. /v1/chat/completions
--   BODY_FILE  the JSON body, sent as is
--   KEYS_FILE  gateway keys, one a line, sent as `Authorization: Bearer KEY` in turn
-- Requests are formatted once in init (each wrk thread has its own Lua state), so
-- request() only hands out the next one.
local prepared = {}
local next_index = 1

local function read_file(path)
  local file = assert(io.open(path, "rb"))
  local text = file:read("*a")
  file:close()
  return text
end

function init(args)
  local path, body = args[1], read_file(args[2])
  for key in read_file(args[3]):gmatch("[^\n]+") do
    local headers = { ["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. key }
    prepared[#prepared + 1] = wrk.format("POST", path, headers, body)
  end
  assert(#prepared > 0, "no keys in " .. args[3])
end

function request()
  local current = prepared[next_index]
  next_index = next_index % #prepared + 1
  return current
end
