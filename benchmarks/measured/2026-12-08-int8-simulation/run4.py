from sim import *
import pickle
reference()
st = get_stats()
T, rec = build(H128, 0.5, st)
hs = rec.scales["embed"]
H = pickle.load(open("/tmp/sim/H.pkl", "rb"))
ALL = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
for grp in (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)):
    print("act-only", grp, score(T, Sim(H128, head_act=False, head_scale=hs, float_names=ALL - set(grp))), flush=True)
print("act-only head", score(T, Sim(H128, head_act=True, head_scale=hs, float_names=ALL)), flush=True)
for damp in (3.0, 10.0):
    G = quantize(T, skip={"embed"}, fn=lambda n, rows: gptq_rows(rows, H[n], percdamp=damp))
    G = quantize(G, skip=QUANTIZED - {"embed"})
    print("gptq layers damp", damp, score(G, Sim(H128, head_scale=hs)), flush=True)
