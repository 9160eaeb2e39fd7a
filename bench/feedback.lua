-- feedback.lua: wrk script that POSTs binary-mode CloudEvents carrying a Seldon Feedback body.
--
-- Usage: wrk -s bench/feedback.lua <url> -- <payload file> <id prefix> [models [pause ms
--        [token file]]]
--   payload file  JSON body written by bench/payloads.py (read once per thread)
--   id prefix     makes every ce-id unique across runs: the server dedups on (ce-source, ce-id),
--                 so a warm-up and a measured run against one server must never share an id.
--   models        when > 0, request n goes to model n mod models and endpoint (n / models) mod 2:
--                 ce-inferenceservicename = isvc-<n mod models> (bench/models.py matches model i
--                 by isvc-<i>), ce-endpoint = default | canary, so every (model, endpoint)
--                 segment gets the same share of the load.
--   pause ms      when > 0, each connection waits that long before each request: a steady
--                 trickle (latency is still timed from send to answer), not a closed loop.
--   token file    when given (not ""), every request carries "Authorization: Bearer <its
--                 content, whitespace trimmed>" (the --auth variants); a path, not the token,
--                 so the token never shows in a process list.
--
-- Why a response() hook: wrk only counts status > 399 as errors; we count every non-2xx ourselves
-- and also count requests *sent*, so the caller can bound the server's row count between
-- "acknowledged" (2xx) and "sent" (in-flight requests abandoned when wrk stops may still count).
-- done() prints one line "BENCH_JSON {...}" that bench/wrk.py parses.

local threads = {}

function setup(thread)
   thread:set("tid", #threads + 1)
   table.insert(threads, thread)
end

function init(args)
   local path = args[1]
   local prefix = args[2] or "bench"
   local f = assert(io.open(path, "rb"), "cannot open payload " .. tostring(path))
   body = f:read("*a")
   f:close()
   id_prefix = prefix .. "-" .. tostring(tid) .. "-"
   models = tonumber(args[3] or "0")
   endpoints = {"default", "canary"}
   local pause_ms = tonumber(args[4] or "0")
   if pause_ms > 0 then
      delay = function() return pause_ms end  -- wrk looks for delay() after init()
   end
   sent = 0
   ok = 0
   non2xx = 0
   statuses = {}
   headers = {
      ["ce-specversion"] = "1.0",
      ["ce-type"] = "io.seldon.serving.feedback",
      ["ce-source"] = "bench",
      ["content-type"] = "application/json",
   }
   local token_path = args[5] or ""
   if token_path ~= "" then
      local t = assert(io.open(token_path, "rb"), "cannot open token " .. token_path)
      local token = t:read("*a"):gsub("^%s+", ""):gsub("%s+$", "")
      t:close()
      headers["authorization"] = "Bearer " .. token
   end
end

function request()
   sent = sent + 1
   headers["ce-id"] = id_prefix .. sent
   if models > 0 then
      headers["ce-inferenceservicename"] = "isvc-" .. (sent % models)
      headers["ce-endpoint"] = endpoints[math.floor(sent / models) % 2 + 1]
   end
   return wrk.format("POST", "/", headers, body)
end

function response(status, hdrs, resp_body)
   if status >= 200 and status < 300 then
      ok = ok + 1
   else
      non2xx = non2xx + 1
      local key = tostring(status)
      statuses[key] = (statuses[key] or 0) + 1
   end
end

function done(summary, latency, requests)
   local t_sent, t_ok, t_bad = 0, 0, 0
   local by_status = {}
   for _, thread in ipairs(threads) do
      t_sent = t_sent + (thread:get("sent") or 0)
      t_ok = t_ok + (thread:get("ok") or 0)
      t_bad = t_bad + (thread:get("non2xx") or 0)
      for code, n in pairs(thread:get("statuses") or {}) do
         by_status[code] = (by_status[code] or 0) + n
      end
   end
   local parts = {}
   for code, n in pairs(by_status) do
      table.insert(parts, string.format('"%s":%d', code, n))
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"duration_us":%d,"requests":%d,"bytes":%d,"sent":%d,"ok":%d,"non2xx":%d,'
      .. '"non2xx_by_status":{' .. table.concat(parts, ",") .. '},'
      .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
      .. '"latency_us":{"min":%d,"mean":%.1f,"max":%d,"stdev":%.1f,'
      .. '"p50":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
      summary.duration, summary.requests, summary.bytes, t_sent, t_ok, t_bad,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.min, latency.mean, latency.max, latency.stdev,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency:percentile(99.9)))
end
