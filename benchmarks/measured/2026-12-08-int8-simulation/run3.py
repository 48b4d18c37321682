from sim import *
import pickle
reference()
st = get_stats()
T, rec = build(H128, 0.5, st)
hs = rec.scales["embed"]
H = pickle.load(open("/tmp/sim/H.pkl", "rb"))
Qs = quantize(T)
print("shipped", score(Qs, Sim(H128, head_scale=hs)), flush=True)
for damp, order in ((0.1, False), (0.1, True), (1.0, False)):
    G = quantize(T, skip={"embed"}, fn=lambda n, rows: gptq_rows(rows, H[n], percdamp=damp, order=order))
    G = quantize(G, skip=QUANTIZED - {"embed"})
    print("gptq layers damp", damp, "order", order, score(G, Sim(H128, head_scale=hs)), flush=True)
rng = np.random.default_rng(0)
# randomized Hadamard: H diag(signs) as R (x R, rows R)
Rs = (H128 * rng.choice([-1.0, 1.0], 128)[None, :]).astype(np.float32)
Rs = (rng.choice([-1.0, 1.0], 128)[:, None] * H128).astype(np.float32)
T2, rec2 = build(Rs, 0.5, st)
print("randomized hadamard 128", score(quantize(T2), Sim(Rs, head_scale=rec2.scales["embed"])), flush=True)
def orth(n):
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * np.sign(np.diag(r))[None]).astype(np.float32)
Rf = {k: orth(k) for k in (640, 1024, 2048)}
T3, rec3 = build(Rf, 0.5, st)
print("full random orthogonal", score(quantize(T3), Sim(Rf, head_scale=rec3.scales["embed"])), flush=True)
