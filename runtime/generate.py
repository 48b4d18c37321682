"""`python -m runtime.generate`: stream a completion to stdout, speed to stderr."""

from __future__ import annotations

import argparse
import sys

from . import integrity


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.generate",
                                description="Generate text from a gemma-aot artifact directory.")
    p.add_argument("--artifacts", required=True, help="artifact directory (has manifest.json)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in Gemma's chat template")
    p.add_argument("--target", default="auto", help="artifact to run (default: auto)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--draft", default=None, metavar="DIR",
                   help="speculative decoding: the artifact directory of a smaller model with the "
                        "same vocabulary, whose proposals the target checks in one verify call")
    p.add_argument("--draft-target", default="auto", help="the draft's artifact (default: auto)")
    p.add_argument("--draft-tokens", type=int, default=None, metavar="K",
                   help="proposals per verify call (default: the target's verify length - 1; "
                        "4 on onnx)")
    integrity.add_arguments(p)
    args = p.parse_args(argv)

    import runtime
    try:
        gen = runtime.load(args.artifacts, target=args.target, draft=args.draft,
                           draft_target=args.draft_target, draft_tokens=args.draft_tokens,
                           **integrity.load_options(args))
        drafted = f", drafted by {gen.draft.manifest.variant} on {gen.draft.target} " \
                  f"({gen.draft_tokens} a call)" if gen.draft else ""
        print(f"[{gen.manifest.variant} on {gen.target}{drafted}]", file=sys.stderr)
        run = gen.stream(args.prompt, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         seed=args.seed, chat=args.chat)
        for piece in run:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except (runtime.ArtifactError, ValueError, TypeError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    sys.stdout.write("\n")
    s = run.stats
    prefill = s["prompt_tokens"] / s["prefill_s"] if s.get("prefill_s") else 0.0
    # without a draft the first token's logits come from the prefill's last step
    decoded = s["generated_tokens"] - (0 if "draft_proposed" in s else 1)
    decode = decoded / s["decode_s"] if s.get("decode_s") and decoded > 0 else 0.0
    kept = f"; {s['draft_accepted']} of {s['draft_proposed']} draft tokens kept" \
        if s.get("draft_proposed") else ""
    print(f"prompt {s['prompt_tokens']} tokens, {prefill:.1f} tok/s prefill (incl. compile on "
          f"first use); generated {s['generated_tokens']} tokens, {decode:.1f} tok/s decode{kept}; "
          f"finish: {s['finish_reason']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
