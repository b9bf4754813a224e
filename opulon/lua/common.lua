-- Shared by every script of the Redis limiter (opulon/limiter_redis.py prepends it).
--
-- A key's data lives under one prefix with a hash tag, P = '<prefix>{k<id>}:', so that it
-- sits in one Redis Cluster slot:
--   P..'m'        hash: 'w<seconds>' and 'b' -> when a node last configured that window or
--                 the budget (the set of windows kept up to date); absent = never seeded
--   P..'w<secs>'  hash: one rolling window. 'r', 'i', 'o': running sums of requests, input
--                 and output tokens; 'h': id of the oldest entry; 'n': the next entry's id;
--                 '<id>' -> 'start ts requests input output' (entries h .. n-1, oldest first)
--   P..'b'        hash: 'r', 'i', 'o', the lifetime totals a budget counts
--   P..'t'        hash: ticket id -> 'at requests input output <secs>=<entry id> ...'
--   P..'l'        zset: ticket id scored by the moment its lease runs out
--   P..'s'        zset: ticket ids settled lately, scored by when (a retried settle is a no-op)
-- Only P..'m' is declared in KEYS (for Redis Cluster's routing); every other key shares its
-- hash tag, so its slot.
-- Times are the calling node's clock (ARGV), never Redis TIME, written with 17 digits so that
-- they read back as the same double the node computed with. Counts and ids are integers
-- (written exactly below 10^14, the precision of Lua's own number format).

local P = ARGV[1]
local NOW_TEXT = ARGV[2]
local NOW = tonumber(NOW_TEXT)
local M, L, T, B, S = P .. 'm', P .. 'l', P .. 't', P .. 'b', P .. 's'
local CHUNK = 500 -- fields per HSET / HDEL, well below Lua's limit on unpacked values
local PURGE_AT_MOST = 64 -- expired leases released per call; the rest by the next calls

local function fmt(x)
  return string.format('%.17g', x)
end

local function value(code, r, i, o)
  if code == 0 then
    return r
  elseif code == 1 then
    return i + o
  elseif code == 2 then
    return i
  end
  return o
end

local meta = {}
local function load_meta()
  local flat = redis.call('HGETALL', M)
  for k = 1, #flat, 2 do
    meta[flat[k]] = tonumber(flat[k + 1])
  end
end

-- Windows opened by this call, by length; false where the key keeps no such window.
local windows = {}
local opened = {}

-- An empty window in place of whatever the key kept for this length.
local function new_window(sec)
  local before = windows[sec]
  if before then
    for k, w in ipairs(opened) do
      if w == before then
        table.remove(opened, k)
        break
      end
    end
  end
  local w = {
    key = P .. 'w' .. sec, sec = sec, res = sec / 1000,
    r = 0, i = 0, o = 0, head = 1, nxt = 1,
    cache = {}, dirty = {}, gone = {}, changed = true,
  }
  windows[sec] = w
  opened[#opened + 1] = w
  return w
end

local function open_window(sec)
  local w = windows[sec]
  if w ~= nil then
    return w
  end
  if meta['w' .. sec] == nil then
    windows[sec] = false
    return false
  end
  local key = P .. 'w' .. sec
  local h = redis.call('HMGET', key, 'r', 'i', 'o', 'h', 'n')
  if not h[5] then
    windows[sec] = false
    return false
  end
  w = {
    key = key, sec = sec, res = sec / 1000,
    r = tonumber(h[1]), i = tonumber(h[2]), o = tonumber(h[3]),
    head = tonumber(h[4]), nxt = tonumber(h[5]),
    cache = {}, dirty = {}, gone = {}, changed = false,
  }
  windows[sec] = w
  opened[#opened + 1] = w
  return w
end

-- Every window the key keeps (configured now or lately), opened.
local function open_all()
  for name, _ in pairs(meta) do
    local sec = string.match(name, '^w(%d+)$')
    if sec then
      open_window(tonumber(sec))
    end
  end
end

local function entry(w, id)
  local e = w.cache[id]
  if e then
    return e
  end
  local v = redis.call('HGET', w.key, id)
  local s, t, r, i, o = string.match(v, '^(%S+) (%S+) (%S+) (%S+) (%S+)$')
  e = { s = tonumber(s), t = tonumber(t), r = tonumber(r), i = tonumber(i), o = tonumber(o) }
  w.cache[id] = e
  return e
end

-- Usage at ts leaves the window once NOW - ts >= its length (entries are in time order).
local function expire(w)
  while w.head < w.nxt do
    local id = w.head
    local e = entry(w, id)
    if NOW - e.t < w.sec then
      break
    end
    w.r, w.i, w.o = w.r - e.r, w.i - e.i, w.o - e.o
    w.gone[#w.gone + 1] = id
    w.cache[id], w.dirty[id] = nil, nil
    w.head = id + 1
    w.changed = true
  end
end

-- Count usage from s to t (s == t for one event): folded into the newest entry when s is
-- within the resolution of that entry's first event or not after its last one, as
-- opulon.limiter._Window.add does; the id of the entry that holds it.
local function add(w, s, t, r, i, o)
  w.r, w.i, w.o = w.r + r, w.i + i, w.o + o
  w.changed = true
  if w.head < w.nxt then
    local id = w.nxt - 1
    local last = entry(w, id)
    if s - last.s <= w.res or s <= last.t then
      if t > last.t then
        last.t = t
      end
      last.r, last.i, last.o = last.r + r, last.i + i, last.o + o
      w.dirty[id] = true
      return id
    end
  end
  local id = w.nxt
  w.nxt = id + 1
  w.cache[id] = { s = s, t = t, r = r, i = i, o = o }
  w.dirty[id] = true
  return id
end

-- Change the entry `id` by the given amounts if it is still in the window.
local function adjust(w, id, r, i, o)
  if id < w.head or id >= w.nxt then
    return
  end
  local e = entry(w, id)
  e.r, e.i, e.o = e.r + r, e.i + i, e.o + o
  w.r, w.i, w.o = w.r + r, w.i + i, w.o + o
  w.dirty[id] = true
  w.changed = true
end

local function used(w, code)
  return value(code, w.r, w.i, w.o)
end

-- At most this many entries are read to answer when usage leaves a window: a key whose
-- window holds many entries with none of a metric (count_tokens calls, say: requests with no
-- tokens) must not make every admission of it read the whole window. Past the bound the
-- answers are conservative: the usage is taken to leave with the whole window.
local SCAN = 64

-- When the oldest usage of metric `code` in the window happened; nil if there is none.
local function oldest(w, code)
  if used(w, code) <= 0 then
    return nil
  end
  for id = w.head, math.min(w.nxt - 1, w.head + SCAN - 1) do
    local e = entry(w, id)
    if value(code, e.r, e.i, e.o) > 0 then
      return e.t
    end
  end
  return NOW
end

-- Seconds until at least `need` of metric `code` has left the window.
local function retry_after(w, code, need)
  local freed = 0
  for id = w.head, math.min(w.nxt - 1, w.head + SCAN - 1) do
    local e = entry(w, id)
    freed = freed + value(code, e.r, e.i, e.o)
    if freed >= need then
      return e.t + w.sec - NOW
    end
  end
  return w.sec
end

local function flush(key, command, args)
  for k = 1, #args, CHUNK do
    redis.call(command, key, unpack(args, k, math.min(k + CHUNK - 1, #args)))
  end
end

local life = nil -- the lifetime totals, or false where the key keeps none
local function open_life()
  if life == nil then
    local h = redis.call('HMGET', B, 'r', 'i', 'o')
    if meta['b'] ~= nil and h[1] then
      life = { r = tonumber(h[1]), i = tonumber(h[2]), o = tonumber(h[3]), changed = false }
    else
      life = false
    end
  end
  return life
end

local function add_life(r, i, o)
  local lf = open_life()
  if lf then
    lf.r, lf.i, lf.o = lf.r + r, lf.i + i, lf.o + o
    lf.changed = true
  end
end

local function save()
  for _, w in ipairs(opened) do
    if w.changed then
      local fields = { 'r', w.r, 'i', w.i, 'o', w.o, 'h', w.head, 'n', w.nxt }
      for id, _ in pairs(w.dirty) do
        local e = w.cache[id]
        fields[#fields + 1] = id
        fields[#fields + 1] = fmt(e.s) .. ' ' .. fmt(e.t) .. ' ' .. e.r .. ' ' .. e.i .. ' ' .. e.o
      end
      flush(w.key, 'HSET', fields)
      if #w.gone > 0 then
        flush(w.key, 'HDEL', w.gone)
      end
      w.changed, w.dirty, w.gone = false, {}, {}
    end
  end
  if life and life.changed then
    redis.call('HSET', B, 'r', life.r, 'i', life.i, 'o', life.o)
    life.changed = false
  end
end

local function parse_ticket(v)
  local at, r, i, o, rest = string.match(v, '^(%S+) (%S+) (%S+) (%S+)(.*)$')
  local tk = { at = tonumber(at), r = tonumber(r), i = tonumber(i), o = tonumber(o), refs = {} }
  for sec, id in string.gmatch(rest, '(%d+)=(%d+)') do
    tk.refs[tonumber(sec)] = tonumber(id)
  end
  return tk
end

local function format_ticket(tk)
  local parts = { fmt(tk.at), tk.r, tk.i, tk.o }
  for sec, id in pairs(tk.refs) do
    parts[#parts + 1] = sec .. '=' .. id
  end
  return table.concat(parts, ' ')
end

-- Release the reservations whose lease ran out (their node died, or stopped renewing): the
-- concurrency slot, and what they reserved in every window still holding it and in the
-- lifetime totals. An unsettled request then counts nothing, as on one node whose counters
-- were rebuilt from the stored rows after a restart.
local function purge()
  local ids = redis.call('ZRANGEBYSCORE', L, '-inf', NOW_TEXT, 'LIMIT', 0, PURGE_AT_MOST)
  if #ids == 0 then
    return
  end
  for _, id in ipairs(ids) do
    local v = redis.call('HGET', T, id)
    if v then
      local tk = parse_ticket(v)
      for sec, eid in pairs(tk.refs) do
        local w = open_window(sec)
        if w then
          expire(w)
          adjust(w, eid, -tk.r, -tk.i, -tk.o)
        end
      end
      add_life(-tk.r, -tk.i, -tk.o)
    end
  end
  redis.call('HDEL', T, unpack(ids))
  redis.call('ZREM', L, unpack(ids))
end

local function live_tickets()
  return redis.call('ZCOUNT', L, '(' .. NOW_TEXT, '+inf')
end

-- Numbers given in one argument, separated by spaces (fewer arguments cost the client less).
local function numbers(text)
  local list = {}
  for word in string.gmatch(text, '%S+') do
    list[#list + 1] = tonumber(word)
  end
  return list
end

-- The limits given as one argument: (metric code, amount, seconds or 0 for a budget)...
local function read_limits(text)
  local flat = numbers(text)
  local limits = {}
  for k = 1, #flat, 3 do
    limits[#limits + 1] = { code = flat[k], amount = flat[k + 1], sec = flat[k + 2] }
  end
  return limits
end

-- Replies are one string of words ('-' for none), which the client splits.
local function words(list)
  return table.concat(list, ' ')
end

-- {2, budget missing (0/1), missing window lengths...} if the key's data for these limits
-- is not in Redis (never seeded, Redis restarted, a limit added); nil when all is there.
local function needs_seed(limits)
  local missing, seen, budget = {}, {}, 0
  for _, lim in ipairs(limits) do
    if lim.sec > 0 then
      if not open_window(lim.sec) and not seen[lim.sec] then
        seen[lim.sec] = true
        missing[#missing + 1] = lim.sec
      end
    elseif not open_life() then
      budget = 1
    end
  end
  if #missing == 0 and budget == 0 then
    return nil
  end
  local reply = { 2, budget }
  for _, sec in ipairs(missing) do
    reply[#reply + 1] = sec
  end
  return reply
end

-- Append, per limit, the amount used and when its oldest usage happened (false if none).
local function append_states(reply, limits)
  for _, lim in ipairs(limits) do
    if lim.sec > 0 then
      local w = open_window(lim.sec)
      expire(w)
      reply[#reply + 1] = used(w, lim.code)
      local t = oldest(w, lim.code)
      reply[#reply + 1] = t and fmt(t) or '-'
    else
      local lf = open_life()
      reply[#reply + 1] = value(lim.code, lf.r, lf.i, lf.o)
      reply[#reply + 1] = '-'
    end
  end
  return reply
end
