-- wrk script: every request carries a query string never sent before, so a response cache
-- never holds its answer: each request is a true miss (lookup, fill lock, upstream request,
-- entry stored). The harness passes a fresh run id after `--`, so warmup and measured runs
-- (and rounds) do not repeat each other's keys. Headers given with -H are kept (wrk.format).
local run, n = "", 0

function init(args)
   run = args[1] or tostring(os.time())
end

function request()
   n = n + 1
   return wrk.format(nil, wrk.path .. "?bench=" .. run .. "-" .. n)
end
