-- wrk script: POST /event with a deviceId and ts that vary per request.
local counter = 0
local thread_id = 0
function setup(thread)
  thread:set("tid", thread_id)
  thread_id = thread_id + 1
end
request = function()
  counter = counter + 1
  local body = string.format(
    '{"deviceId":"bench-%d-%d","ts":%d,"latitude":37.7749,"longitude":-122.4194}',
    tid or 0, counter % 500, 1700000000000 + counter)
  return wrk.format("POST", "/event", {["Content-Type"] = "application/json"}, body)
end
