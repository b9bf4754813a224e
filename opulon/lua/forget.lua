-- Drop everything Redis keeps of a key (it was deleted). ARGV: P, now.
load_meta()
for name, _ in pairs(meta) do
  if string.sub(name, 1, 1) == 'w' then
    redis.call('DEL', P .. name)
  end
end
redis.call('DEL', M, L, T, B, S)
return 1
