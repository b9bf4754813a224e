-- What a key has used of each limit, for the status page and rate-limit headers.
-- ARGV: P, now, the limits (see read_limits).
-- Reply: {0, in flight, states...}, or {2, ...} if the key needs seeding.

local limits = read_limits(ARGV[3])
load_meta()
purge()
local missing = needs_seed(limits)
if missing then
  save()
  return words(missing)
end
local reply = append_states({ 0, live_tickets() }, limits)
save()
return words(reply)
