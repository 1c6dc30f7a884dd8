-- wrk script: POST /events/batch with 100 events per request.
local counter = 0
request = function()
  counter = counter + 1
  local items = {}
  for i = 1, 100 do
    items[i] = string.format('{"deviceId":"batch-%d","ts":%d,"latitude":37.7749,"longitude":-122.4194}',
      i % 50, 1700000000000 + counter * 100 + i)
  end
  return wrk.format("POST", "/events/batch", {["Content-Type"] = "application/json"}, "[" .. table.concat(items, ",") .. "]")
end
