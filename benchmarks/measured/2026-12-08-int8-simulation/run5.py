from sim import *
import pickle
reference()
st = get_stats()
T, rec = build(H128, 0.5, st)
hs = rec.scales["embed"]
H = pickle.load(open("/tmp/sim/H.pkl", "rb"))
G = quantize(T, skip={"embed"}, fn=lambda n, rows: gptq_rows(rows, H[n], percdamp=3.0))
G = quantize(G, skip=QUANTIZED - {"embed"})
class FloatLookup(Sim):
    def embed_rows(self, params, tokens):
        rows = params["embed_f"][tokens]
        rows = blockrot(rows, jnp.asarray(self.R).T)
        return rows / self.head_scale
G2 = dict(G); G2["embed_f"] = T["embed"]
print("gptq3 + float lookup", score(G2, FloatLookup(H128, head_scale=hs)), flush=True)
del G2
Ha = hessians(T, H128, hs, act=True)
Ga = quantize(T, skip={"embed"}, fn=lambda n, rows: gptq_rows(rows, Ha[n], percdamp=3.0))
Ga = quantize(Ga, skip=QUANTIZED - {"embed"})
print("gptq3 act-hessian", score(Ga, Sim(H128, head_scale=hs)), flush=True)
del Ga, Ha
for alpha in (0.4, 0.6):
    Tb, recb = build(H128, alpha, st)
    hb = recb.scales["embed"]
    Hb = hessians(Tb, H128, hb)
    Gb = quantize(Tb, skip={"embed"}, fn=lambda n, rows: gptq_rows(rows, Hb[n], percdamp=3.0))
    Gb = quantize(Gb, skip=QUANTIZED - {"embed"})
    print("gptq3 alpha", alpha, score(Gb, Sim(H128, head_scale=hb)), flush=True)
