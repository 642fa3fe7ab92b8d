-- Sophia edge filter (runs before grpc_json_transcoder; responses pass through it after it).
--
-- Request path:
--   * drops every client-sent x-envoy-* header (Envoy sanitizes only some of them);
--   * a grpc-timeout header that is not gRPC's format (1-8 digits, then one of H M S m u n) → 400;
--   * bodies of transcoded routes (table in edge_schema.lua, generated from the descriptor set; a path
--     with one trailing slash is the same route, as for the transcoder): answers 400 for a JSON member
--     the proto does not declare (the transcoder would drop it silently) unless its value is null, for
--     JSON nested deeper than MAX_JSON_DEPTH, and for an object or array as the value of a map whose
--     values are scalars (the transcoder would fail on both with a 500);
--   * POST /v1/chat/completions: when the TOP-LEVEL object has "stream": true, rewrites :path to
--     /v1/chat/completions:stream so the transcoder picks the server-streaming RPC; for it and for a
--     direct POST to that path, whether stream_options.include_usage (or streamOptions.includeUsage)
--     is true is kept (dynamic metadata) for the response side.
--   One pass of a small JSON scanner does both (strings with escapes, nesting depth, no recursion).
-- Response path (transcoded requests only; native gRPC passes untouched):
--   * removes grpc-status/grpc-message/... headers;
--   * text/event-stream (2xx): appends "data: [DONE]\n\n" right after the final chunk;
--   * errors: google.rpc.Status JSON ({"code":N,"message":...,"details":[...]}) → OpenAI error shape
--     {"error":{"message","type","param","code":"<GRPC_CODE_NAME>"}}, `param` from a BadRequest detail.

local META = "sophia.edge"

local byte, find, sub = string.byte, string.find, string.sub

-- Index just after the closing quote of the JSON string starting at i (s[i] == '"'), or nil.
local function skip_string(s, i)
  local j = i + 1
  while true do
    local k = find(s, '["\\]', j)
    if not k then return nil end
    if byte(s, k) == 92 then j = k + 2 else return k + 1 end
  end
end

-- Keys are compared after decoding the escapes a client could use to hide them ("str\u0065am").
local SIMPLE_ESC = { ['"'] = '"', ['\\'] = '\\', ['/'] = '/', b = '\b', f = '\f', n = '\n', r = '\r', t = '\t' }
local function decode_key(raw)
  if not find(raw, "\\", 1, true) then return raw end
  local out, i = {}, 1
  while i <= #raw do
    local c = sub(raw, i, i)
    if c ~= "\\" then
      out[#out + 1] = c
      i = i + 1
    else
      local e = sub(raw, i + 1, i + 1)
      local hex = e == "u" and sub(raw, i + 2, i + 5) or ""
      if #hex == 4 and find(hex, "^%x+$") then
        local cp = tonumber(hex, 16)
        out[#out + 1] = cp < 128 and string.char(cp) or "?" -- only ASCII matters for our keys
        i = i + 6
      else
        out[#out + 1] = SIMPLE_ESC[e] or e
        i = i + 2
      end
    end
  end
  return table.concat(out)
end

local STRUCT = '["{}%[%],:]'

-- Deepest JSON nesting a request body may have (the top-level object is depth 1). OpenAI bodies need
-- well under 10 levels; tool parameter schemas a few more. Deeper documents are refused with 400 naming
-- the member: protobuf's parser gives up on them (google.protobuf.Value nests two messages per level).
local MAX_JSON_DEPTH = 32

-- Generated from the descriptor set: request-body fields per message and the routes that carry a body.
local SCHEMA = require("edge_schema")
local MESSAGES = SCHEMA.messages

-- "messages[].foo" style location of the member being read at `depth`.
local function member_path(depth, kinds, keys)
  local parts = {}
  for d = 1, depth do
    if kinds[d] == 91 then
      parts[#parts + 1] = "[]"
    else
      parts[#parts + 1] = (#parts > 0 and "." or "") .. (keys[d] or "")
    end
  end
  return table.concat(parts)
end

-- Scans a JSON document once (strings with escapes, nesting depth, no recursion) and calls
-- on_value(depth, kinds, keys, value_start) for every object member value; keys[d] is the member name
-- at depth d (depth 1 = the top-level object), kinds[d] 123 '{' or 91 '['. Returns "too_deep", path
-- for nesting beyond MAX_JSON_DEPTH. With root_schema (a message name from edge_schema.lua) it also
-- checks the body against the proto and returns "unknown", path at the first undeclared member whose
-- value is not null, or "not_scalar", path for an object or array as a scalar-valued map's value.
-- Returns "not_object" when the top level is not an object and "ok" otherwise; malformed JSON is left to
-- the transcoder.
local function scan_object(s, root_schema, on_value)
  local i = find(s, "%S")
  if not i or byte(s, i) ~= 123 then return "not_object" end -- '{'
  -- schemas[d]: message name, "map:[T]" (free keys, values T) or false (free-form), for the object at
  -- depth d; for an array, the schema of its elements.
  local depth, kinds, keys, schemas, expect_key = 0, {}, {}, {}, false
  while i do
    local c = byte(s, i)
    if c == 34 then -- '"'
      local j = skip_string(s, i)
      if not j then return "ok" end
      if expect_key and kinds[depth] == 123 then
        local key = decode_key(sub(s, i + 1, j - 2))
        keys[depth] = key
        expect_key = false
        local sc = schemas[depth]
        if sc and sub(sc, 1, 4) ~= "map:" then
          local fields = MESSAGES[sc]
          -- The OpenAI SDK sends back its own response objects as history, with every field it knows
          -- and we do not (annotations, audio, parsed, ...) as null: null says nothing, the transcoder
          -- drops it.
          if fields and fields[key] == nil and not find(s, '^%s*:%s*null[%s,}]', j) then
            return "unknown", member_path(depth, kinds, keys)
          end
        end
      end
      i = find(s, STRUCT, j)
    else
      if c == 123 or c == 91 then -- '{' '['
        local child = false
        if depth == 0 then
          child = root_schema or false
        else
          local ps = schemas[depth]
          if kinds[depth] == 91 then
            child = ps -- element of a repeated field
          elseif ps == "map:=" then
            return "not_scalar", member_path(depth, kinds, keys)
          elseif ps and sub(ps, 1, 4) == "map:" then
            child = #ps > 4 and sub(ps, 5) or false -- a map value
          elseif ps then
            local f = MESSAGES[ps] and MESSAGES[ps][keys[depth]]
            child = (f and f ~= "") and f or false
          end
        end
        if depth >= MAX_JSON_DEPTH then return "too_deep", member_path(depth, kinds, keys) end
        depth = depth + 1
        kinds[depth], keys[depth], schemas[depth] = c, nil, child
        expect_key = (c == 123)
      elseif c == 125 or c == 93 then -- '}' ']'
        if depth == 0 then return "ok" end
        depth = depth - 1
        expect_key = false
      elseif c == 44 then -- ','
        expect_key = (kinds[depth] == 123)
      elseif c == 58 and on_value then -- ':' → a member value starts after it
        if on_value(depth, kinds, keys, i + 1) then return "ok" end
      end
      i = find(s, STRUCT, i + 1)
    end
  end
  return "ok"
end

-- A JSON bool at i; the transcoder's parser also takes the strings "true"/"false" for bools.
local function literal_at(s, i)
  if find(s, '^%s*"?true[%s",}]', i) then return true end
  if find(s, '^%s*"?false[%s",}]', i) then return false end
  return nil
end

-- Either JSON name of stream_options.include_usage's fields (protobuf's parser takes both).
local STREAM_OPTIONS = { stream_options = true, streamOptions = true }
local INCLUDE_USAGE = { include_usage = true, includeUsage = true }

local function body_route(method, path)
  for _, r in ipairs(SCHEMA.routes) do
    if r.method == method and find(path, r.path) then return r end
  end
  return nil
end

-- A 400 from the edge itself; local_reply_config shapes it as an OpenAI error with `param` set.
local function refuse(handle, param, message)
  local meta = handle:streamInfo():dynamicMetadata()
  meta:set(META, "refused", true)
  meta:set(META, "param", param)
  handle:respond({ [":status"] = "400" }, param .. ": " .. message)
end

-- gRPC's TimeoutValue (1 to 8 digits) and TimeoutUnit; anything else fails inside the Gateway's gRPC
-- stack (500) instead of naming the header.
local function valid_grpc_timeout(v)
  return #v <= 9 and find(v, "^%d+[HMSmun]$") ~= nil
end

local REFUSALS = {
  unknown = "unknown field",
  too_deep = "nested deeper than " .. MAX_JSON_DEPTH .. " levels",
  not_scalar = "map values must be strings, numbers or booleans, not objects or arrays",
}

-- Transcoded unary answers whose headers the Gateway sends as trailing metadata when asked (see below).
local HEADERS_IN_TRAILERS = "x-sophia-edge-headers-in-trailers"
local UNARY_ANSWERS = { ["/v1/chat/completions"] = true, ["/v1/embeddings"] = true }

function envoy_on_request(handle)
  local headers = handle:headers()

  local drop = {}
  for name, _ in pairs(headers) do
    if sub(name, 1, 8) == "x-envoy-" then drop[#drop + 1] = name end
  end
  for _, name in ipairs(drop) do headers:remove(name) end
  headers:remove(HEADERS_IN_TRAILERS) -- only the edge asks for it

  if find(headers:get("content-type") or "", "application/grpc", 1, true) == 1 then
    handle:streamInfo():dynamicMetadata():set(META, "grpc_native", true)
    return
  end

  local grpc_timeout = headers:get("grpc-timeout")
  if grpc_timeout and not valid_grpc_timeout(grpc_timeout) then
    refuse(handle, "grpc-timeout", "must be 1 to 8 digits and a unit (H, M, S, m, u or n), e.g. 30S")
    return
  end

  local method = headers:get(":method")
  if method == "GET" or method == "DELETE" or method == "HEAD" then return end
  local path = headers:get(":path") or ""
  local q = find(path, "?", 1, true)
  local base, query = path, ""
  if q then base, query = sub(path, 1, q - 1), sub(path, q) end
  -- The transcoder serves a path with one trailing slash as the same route: so must the checks here.
  if #base > 1 and sub(base, -1) == "/" then base = sub(base, 1, -2) end
  local route = body_route(method, base)
  if route == nil then return end
  local stream_path = (base == "/v1/chat/completions:stream")
  local is_chat = stream_path or base == "/v1/chat/completions"

  local body = handle:body()
  if body == nil then return end
  local n = body:length()
  if n == 0 then return end
  local s = body:getBytes(0, n)

  local stream, include_usage = false, false
  local result, where = scan_object(s, route.body, is_chat and function(depth, kinds, keys, at)
    if depth == 1 and keys[1] == "stream" then
      local v = literal_at(s, at)
      if v ~= nil then stream = v end
    elseif depth == 2 and kinds[2] == 123 and STREAM_OPTIONS[keys[1]] and INCLUDE_USAGE[keys[2]] then
      local v = literal_at(s, at)
      if v ~= nil then include_usage = v end
    end
    return false
  end or nil)

  if REFUSALS[result] then
    refuse(handle, where, REFUSALS[result])
    return
  end
  -- Header/stream objects from before the body() yield are stale: fetch them again.
  if stream and not stream_path then
    -- Modifying a header here also clears the cached route.
    handle:headers():replace(":path", "/v1/chat/completions:stream" .. query)
  end
  if stream or stream_path then
    handle:streamInfo():dynamicMetadata():set(META, "include_usage", include_usage)
  elseif UNARY_ANSWERS[base] then
    -- A unary answer: the Gateway sends its headers in the answer's own batch, as trailing metadata,
    -- and envoy_on_response lifts them into the HTTP headers (one gRPC batch less per request).
    handle:headers():replace(HEADERS_IN_TRAILERS, "1")
    handle:streamInfo():dynamicMetadata():set(META, "headers_in_trailers", true)
  end
end

-- gRPC canonical code → OpenAI-style error type.
local ERROR_TYPES = {
  [1] = "cancelled_error",           -- CANCELLED
  [3] = "invalid_request_error",     -- INVALID_ARGUMENT
  [4] = "timeout_error",             -- DEADLINE_EXCEEDED
  [5] = "not_found_error",           -- NOT_FOUND
  [6] = "conflict_error",            -- ALREADY_EXISTS
  [7] = "permission_error",          -- PERMISSION_DENIED
  [8] = "rate_limit_error",          -- RESOURCE_EXHAUSTED
  [9] = "invalid_request_error",     -- FAILED_PRECONDITION
  [10] = "conflict_error",           -- ABORTED
  [11] = "invalid_request_error",    -- OUT_OF_RANGE
  [12] = "invalid_request_error",    -- UNIMPLEMENTED
  [14] = "service_unavailable_error", -- UNAVAILABLE
  [16] = "authentication_error",     -- UNAUTHENTICATED
}
local CODE_NAMES = {
  [0] = "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
  "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
  "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
}

local function json_string(v)
  return '"' .. v:gsub('[%c"\\]', function(c)
    if c == '"' then return '\\"' elseif c == "\\" then return "\\\\" end
    return string.format("\\u%04x", byte(c))
  end) .. '"'
end

local function error_json(code, message_json, type_override, param_json)
  return '{"error":{"message":' .. message_json .. ',"type":' ..
      json_string(type_override or ERROR_TYPES[code] or "server_error") ..
      ',"param":' .. (param_json or "null") ..
      ',"code":' .. json_string(CODE_NAMES[code] or tostring(code)) .. '}}'
end

-- The field of the first google.rpc.BadRequest field violation in the printed Status's "details" value
-- (starting at `at`), as the raw JSON string, or nil. The transcoder prints proto field names
-- (preserve_proto_field_names) in proto field order, so "field" comes first in a violation.
local function violated_field(s, at)
  local _, e = find(s, '"field_violations"%s*:%s*%[%s*{%s*"field"%s*:%s*"', at)
  if not e then return nil end
  local qe = skip_string(s, e)
  return qe and sub(s, e, qe - 1) or nil
end

-- {"code":N,"message":"...","details":[...]} (google.rpc.Status as printed by the transcoder) →
-- {"error":{"message":"...","type":"...","param":<field or null>,"code":"<GRPC_CODE_NAME>"}}. The message
-- string is copied verbatim (already valid JSON); `param` is the field a BadRequest detail names. Returns
-- nil when the body is not a top-level Status object.
local function openai_error(s, type_override)
  local code, message_raw, param_raw, has_error_key = nil, nil, nil, false
  local result = scan_object(s, nil, function(depth, _, keys, at)
    if depth ~= 1 then return false end
    local k = keys[1]
    if k == "error" then
      has_error_key = true
      return true
    elseif k == "code" then
      local _, _, num = find(s, "^%s*(%d+)", at)
      if num then code = tonumber(num) end
    elseif k == "message" then
      local qs = find(s, "%S", at)
      if qs and byte(s, qs) == 34 then
        local qe = skip_string(s, qs)
        if qe then message_raw = sub(s, qs, qe - 1) end
      end
    elseif k == "details" then
      param_raw = violated_field(s, at)
    end
    return false
  end)
  if result ~= "ok" or has_error_key or code == nil then return nil end
  return error_json(code, message_raw or '""', type_override, param_raw)
end

local function percent_decode(v)
  return (v:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

local GRPC_HEADERS = { "grpc-status", "grpc-message", "grpc-status-details-bin", "grpc-accept-encoding",
  "grpc-encoding" }

function envoy_on_response(handle)
  local meta = handle:streamInfo():dynamicMetadata():get(META) or {}
  if meta.grpc_native then return end -- a gRPC client talking gRPC through the edge: untouched

  local headers = handle:headers()
  local status = tonumber(headers:get(":status")) or 0
  local ctype = headers:get("content-type") or ""
  local grpc_status = tonumber(headers:get("grpc-status") or "")
  local grpc_message = headers:get("grpc-message")
  -- Optional override from the gateway's trailing metadata, e.g. "insufficient_quota".
  local error_type = headers:get("x-sophia-error-type")

  -- The transcoder leaves the gRPC status headers on transcoded responses; HTTP clients have the body.
  for _, name in ipairs(GRPC_HEADERS) do headers:remove(name) end

  if status >= 200 and status < 300 then
    if meta.headers_in_trailers then
      -- The answer's headers came as trailing metadata (the transcoder copies only grpc-status and
      -- grpc-message from trailers): lifted into the HTTP headers, which the transcoder held until the
      -- end of the unary answer anyway.
      handle:body()
      local trailers = handle:trailers()
      if trailers == nil then return end
      local lifted = {}
      for name, value in pairs(trailers) do
        if name == "x-request-id" or sub(name, 1, 9) == "x-sophia-" then
          lifted[#lifted + 1] = { name, value }
        end
      end
      headers = handle:headers()
      for _, pair in ipairs(lifted) do
        headers:replace(pair[1], pair[2])
        trailers:remove(pair[1])
      end
      return
    end
    if not find(ctype, "text/event-stream", 1, true) then return end
    -- The transcoder cannot emit anything when the gRPC stream ends (trailers), so "[DONE]" goes right
    -- after the chunk that ends an OpenAI stream: the one with "usage" when include_usage was asked
    -- for, else the one with a non-empty finish_reason. Those keys appear unescaped only as real JSON
    -- keys (inside strings every quote is escaped).
    local marker = meta.include_usage and '"usage":{' or '"finish_reason":"[^"]'
    local done = false
    for chunk in handle:bodyChunks() do
      local n = chunk:length()
      if not done and n > 0 then
        local s = chunk:getBytes(0, n)
        if byte(s, 1) == 123 then
          -- A gRPC error after the gateway had sent response headers but no message: the transcoder
          -- writes the bare google.rpc.Status JSON into the already-200 SSE body. Frame it as an
          -- OpenAI in-stream error event instead (the SDK raises APIError on it).
          local shaped = openai_error(s, nil)
          if shaped then
            chunk:setBytes("data: " .. shaped .. "\n\n")
            done = true
          end
        elseif find(s, marker) then
          chunk:setBytes(s .. "data: [DONE]\n\n")
          done = true
        end
      end
    end
    return
  end

  -- Errors from the transcoder: JSON google.rpc.Status, or an empty body (see below) still labelled
  -- application/grpc or text/event-stream. Local replies are already shaped by local_reply_config.
  if not (find(ctype, "application/json", 1, true) or find(ctype, "application/grpc", 1, true) or
          find(ctype, "text/event-stream", 1, true)) then
    return
  end
  local body = handle:body(true)
  -- When the stream ended with trailers and no data, the first call (which waited) gives nil; a second
  -- call with always_wrap_body creates an empty body we can fill.
  if body == nil then body = handle:body(true) end
  if body == nil then return end
  local n = body:length()
  if n > 65536 then return end
  local shaped = n > 0 and openai_error(body:getBytes(0, n), error_type) or nil
  if shaped == nil and n == 0 and grpc_status then
    -- The transcoder leaves the body empty when it cannot print grpc-status-details-bin (detail types
    -- missing from the descriptor set): build the error from grpc-status / grpc-message instead.
    shaped = error_json(grpc_status, json_string(percent_decode(grpc_message or "")), error_type)
    handle:headers():replace("content-type", "application/json")
  end
  if shaped then
    body:setBytes(shaped) -- also updates content-length
  end
end
