from sim import *
import pickle
reference()
st = get_stats()
T, rec = build(H128, 0.5, st)
hs = rec.scales["embed"]
H = pickle.load(open("/tmp/sim/H.pkl", "rb"))
G = quantize(T, skip={"embed"}, fn=lambda n, rows: gptq_rows(rows, H[n], percdamp=3.0))
G = quantize(G, skip=QUANTIZED - {"embed"})
def qd8_split(x, parts):
    k = x.shape[-1]
    xs = x.reshape(*x.shape[:-1], parts, k // parts)
    return qd8(xs).reshape(x.shape)
class Split(Sim):
    def __init__(self, *a, split=(), parts=2, **kw):
        super().__init__(*a, **kw); self.split = set(split); self.parts = parts
    def project(self, x, p, name, layer):
        x = blockrot(x, jnp.asarray(self.R))
        if name in self.float_names:
            return model.linear(x, p[name])
        x = qd8_split(x, self.parts) if name in self.split else qd8(x)
        return model.linear(x, p[name])
print("gptq3 split2 gate/up/down", score(G, Split(H128, head_scale=hs, split=("gate_proj", "up_proj", "down_proj"))), flush=True)
print("gptq3 split4 down, split2 gate/up", score(G, Split(H128, head_scale=hs, split=("down_proj",), parts=4)), flush=True)
for grp in (("down_proj",), ("gate_proj", "up_proj")):
    Gf = dict(G)
    for l in range(cfg.num_layers):
        for n in grp:
            Gf[f"layers.{l}.{n}"] = T[f"layers.{l}.{n}"]
    print("gptq3 float", grp, score(Gf, Sim(H128, head_scale=hs, float_names=set(grp))), flush=True)
