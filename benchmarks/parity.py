"""How exact the runtime is: per case, max |ours - reference| of every part of a spoken answer, in fp32.

    python benchmarks/parity.py [--cases text,eos,...] [--dir DIR] [--json]
    omnivox bench parity ...

The cases and checkpoints are those of tests/test_speech_parity.py (tests/parity.py): tiny random checkpoints of
four Talker/Thinker shapes written with the reference implementation, text / image / audio / video /
audio-in-video prompts, both voices, answers ending by EOS and by the limits, a long answer and a second
conversation turn. The reference is `Qwen2_5OmniForConditionalGeneration.generate` (greedy,
talker_do_sample=False) loaded from the saved files; ours is the streaming pipeline as users run it (prefix reuse
and the overlapped Thinker on). Columns:

- thinker / talker: max |diff| of the raw logits over every step (and whether the chosen ids are identical);
- mel / wave: our one-shot token2wav given the reference's start noise, against the reference's mel / waveform;
- stream: the pipeline's streamed audio against our streaming driver on the same codes (exact);
- stream~1shot: rel L2 between the streamed audio and a whole-utterance solve with the same noise. Not parity:
  streaming solves the DiT in windows with limited context (talker/token2wav.py), as the authors' streaming does.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import torch  # noqa: E402

import parity  # noqa: E402

CONVERSATION = "second turn"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = [c.name for c in parity.CASES] + [CONVERSATION]
    p.add_argument("--cases", default=",".join(names), help=f"comma-separated, from: {', '.join(names)}")
    p.add_argument("--dir", default=None, help="where the checkpoints are written (default: a temporary folder)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON lines instead of a table")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    wanted = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in names]
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    torch.set_num_threads(args.threads)
    root = Path(args.dir or tempfile.mkdtemp(prefix="omnivox-parity-"))
    media = parity.write_media(root / "media")
    built: dict = {}

    def get(shape):
        if shape not in built:
            built[shape] = parity.build(shape, root / shape, media)
        return built[shape]

    header = (f"{'case':<16} {'shape':<5} {'thinker':>9} {'talker':>9} {'codes':>6} {'mel':>9} {'wave':>9} "
              f"{'stream':>9} {'stream~1shot':>12}  ids   time")
    if not args.json:
        print(header)
    worst = 0.0
    for name in wanted:
        t0 = time.perf_counter()
        if name == CONVERSATION:
            shape, rows = "pb", parity.conversation(get("pb"))["turn 2"]
        else:
            case = next(c for c in parity.CASES if c.name == name)
            b = get(case.shape)
            shape, rows = case.shape, parity.compare(b.omni, b.reference(case), b.ours(case), case.speaker)
        bad = parity.failures(rows)
        rows.update(case=name, shape=shape, seconds=round(time.perf_counter() - t0, 1), failures=bad)
        worst = max(worst, *(rows[k] for k in ("thinker logits", "talker logits", "mel one-shot", "wave one-shot",
                                               "stream == driver")))
        if args.json:
            print(json.dumps(rows))
        else:
            same = "same" if rows["thinker tokens equal"] and rows["codes equal"] else "DIFF"
            print(f"{name:<16} {shape:<5} {rows['thinker logits']:>9.1e} {rows['talker logits']:>9.1e} "
                  f"{rows['codes']:>6} {rows['mel one-shot']:>9.1e} {rows['wave one-shot']:>9.1e} "
                  f"{rows['stream == driver']:>9.1e} {rows['stream vs one-shot rel L2']:>12.1e}  {same}  "
                  f"{rows['seconds']:.0f}s" + (f"  FAILS: {', '.join(bad)}" if bad else ""), flush=True)
    if not args.json:
        print(f"worst max |diff| {worst:.1e} (bound {parity.FP32_BOUND:g}); checkpoints in {root}")
    return 0 if worst <= parity.FP32_BOUND else 1


if __name__ == "__main__":
    sys.exit(main())
