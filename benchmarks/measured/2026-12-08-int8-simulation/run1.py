from sim import *
reference()
st = get_stats()
print("stats", time.time() - t0, flush=True)
T, rec = build(H128, 0.5, st)
hs = rec.scales["embed"]
Q = quantize(T)
print("shipped", score(Q, Sim(H128, head_scale=hs)), flush=True)
print("w-float act-q", score(T, Sim(H128, head_scale=hs)), flush=True)
print("w-q act-float", score(Q, Sim(H128, act=False, head_act=False, head_scale=hs)), flush=True)
print("done", time.time() - t0)
