-- Build a key's windows and lifetime totals from its stored usage, where Redis lacks them.
-- ARGV: P, now, replace (1: rebuild even what exists), ttl (ms), budget given (0/1), the
-- lifetime requests, input and output, the number of windows, then per window: its length,
-- its number of entries and the entries (start, ts, requests, input, output), oldest first,
-- folded by the node at the window's resolution.
-- The reservations of requests in flight are added at their moments, as
-- opulon.limiter.Limiter.load_history keeps them. Without replace a window or budget that
-- exists is left alone, so two nodes seeding at once count the history once.
-- Reply: the number of windows and budgets built.

local REPLACE = ARGV[3] == '1'
local TTL = ARGV[4]
local BUDGET = ARGV[5] == '1'
local LIFE_R, LIFE_I, LIFE_O = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local COUNT = tonumber(ARGV[9])

load_meta()
purge()

local tickets = {}
local flat = redis.call('HGETALL', T)
for k = 1, #flat, 2 do
  local tk = parse_ticket(flat[k + 1])
  tk.id = flat[k]
  tickets[#tickets + 1] = tk
end
table.sort(tickets, function(a, b)
  return a.at < b.at
end)

local built = 0
local fields = {}
local pos = 10
for _ = 1, COUNT do
  local sec, n = tonumber(ARGV[pos]), tonumber(ARGV[pos + 1])
  local first = pos + 2
  pos = first + 5 * n
  if REPLACE or not open_window(sec) then
    redis.call('DEL', P .. 'w' .. sec)
    local w = new_window(sec)
    local j, q = 0, 1
    while q <= #tickets and NOW - tickets[q].at >= sec do
      tickets[q].refs[sec], tickets[q].dirty = nil, true
      q = q + 1
    end
    while j < n or q <= #tickets do
      local base = first + 5 * j
      if q > #tickets or (j < n and tonumber(ARGV[base]) <= tickets[q].at) then
        add(w, tonumber(ARGV[base]), tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2]),
          tonumber(ARGV[base + 3]), tonumber(ARGV[base + 4]))
        j = j + 1
      else
        local tk = tickets[q]
        tk.refs[sec], tk.dirty = add(w, tk.at, tk.at, tk.r, tk.i, tk.o), true
        q = q + 1
      end
    end
    meta['w' .. sec] = NOW
    fields[#fields + 1] = 'w' .. sec
    fields[#fields + 1] = NOW_TEXT
    built = built + 1
  end
end

if BUDGET and (REPLACE or not open_life()) then
  life = { r = LIFE_R, i = LIFE_I, o = LIFE_O, changed = true }
  for _, tk in ipairs(tickets) do
    life.r, life.i, life.o = life.r + tk.r, life.i + tk.i, life.o + tk.o
  end
  meta['b'] = NOW
  fields[#fields + 1] = 'b'
  fields[#fields + 1] = NOW_TEXT
  built = built + 1
end

if built > 0 then
  redis.call('HSET', M, unpack(fields))
  save()
  for _, tk in ipairs(tickets) do
    if tk.dirty then
      redis.call('HSET', T, tk.id, format_ticket(tk))
    end
  end
  local keys = { M, T, L, B, S }
  for name, _ in pairs(meta) do
    if string.sub(name, 1, 1) == 'w' then
      keys[#keys + 1] = P .. name
    end
  end
  for _, key in ipairs(keys) do
    redis.call('PEXPIRE', key, TTL)
  end
end
return built
