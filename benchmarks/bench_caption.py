"""plait's caption-objective training step against open_clip's CoCa forward + backward on the same tiny model.

Both sides train contrastive (weight 1) + captioning (weight 2, CoCa's weights) on the same towers and decoder
(plait's `tiny`: 64 px, 16 px patches, 2 x 128 image and text towers, context 32; a 2-block decoder): plait through
Objective.augment + PlaitModel.forward + Objective + backward + AdamW, open_clip through CoCa.forward + CoCaLoss
+ backward + AdamW, from the same weights (plait's export mapping). Step times are medians over interleaved
rounds, so load from other processes hits both alike; the ratio is the median of each round's own ratio.
Usage: .venv/bin/python benchmarks/bench_caption.py [--batch 32] [--rounds 7] [--steps 5]

--generate: caption generation speed instead (captions/s, greedy and beam search with 3 beams, the decoding of
`plait caption`) for the demo's model size (`fmnist-vit`: 28 px, 7 px patches, 4 x 128 image tower, 2 x 128 text
tower, context 16) with the default 2-block decoder, from fresh weights: such a decoder hardly ever picks the end
of text, so each caption runs to --max-length tokens, the most a caption of that length can cost (a trained model's
captions end earlier and cost less). Medians over rounds of whole batches.
Usage: .venv/bin/python benchmarks/bench_caption.py --generate [--batch 32] [--rounds 5] [--max-length 16 8]
    [--threads 1]  (on a loaded 2-core machine one thread wastes less time waiting for the other)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import open_clip
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.models.caption_head import beam_search, captioner_for, greedy  # noqa: E402
from pipeline.artifacts.export import clip_state, coca_config, coca_state, heads_state  # noqa: E402
from pipeline.models.model import build_model  # noqa: E402
from pipeline.models.sizes import model_config  # noqa: E402
from pipeline.objectives.combined import Objective  # noqa: E402
from pipeline.objectives.registry import ObjectiveConfig  # noqa: E402
from pipeline.train.distributed import World  # noqa: E402

CAPTIONS = ["a photo of a t-shirt", "a black and white photo of a pair of trousers", "a pullover", "a dress",
            "a grey coat on a plain background", "a sandal", "a shirt", "a sneaker", "a bag", "an ankle boot"]


def timed(step, steps: int) -> float:
    step()                                                   # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--generate", action="store_true", help="time caption generation instead of training")
    parser.add_argument("--max-length", type=int, nargs="+", default=[16, 8],
                        help="--generate: tokens per caption, start and end included")
    parser.add_argument("--beams", type=int, default=3, help="--generate: beam width of the beam-search rows")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.generate:
        return generation_speed(args)
    torch.manual_seed(0)
    cfg = ObjectiveConfig(caption={"weight": 2.0, "layers": 2, "heads": 2})
    model_cfg = model_config("tiny")
    plait = build_model(model_cfg, cfg)
    objective = Objective(cfg, World())
    coca = open_clip.CoCa(**{k: v for k, v in coca_config(model_cfg).items() if k != "custom_text"})
    state = plait.state_dict()
    coca.load_state_dict(coca_state(clip_state(state), heads_state(state)))
    loss = open_clip.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0)
    images = torch.randn(args.batch, 3, 64, 64)
    text = open_clip.SimpleTokenizer(context_length=32)([CAPTIONS[i % len(CAPTIONS)] for i in range(args.batch)])
    opt_plait = torch.optim.AdamW(plait.parameters(), lr=1e-4)
    opt_coca = torch.optim.AdamW(coca.parameters(), lr=1e-4)

    def plait_step():
        batch = objective.augment({"image": images, "text": text}, 0)
        total, _, _ = objective(plait(batch), batch, 0)
        opt_plait.zero_grad(set_to_none=True)
        total.backward()
        opt_plait.step()

    def coca_step():
        out = coca(images, text)
        total = sum(loss(out["image_features"], out["text_features"], out["logits"], out["labels"],
                         out["logit_scale"], output_dict=True).values())
        opt_coca.zero_grad(set_to_none=True)
        total.backward()
        opt_coca.step()

    ours, theirs = [], []
    for _ in range(args.rounds):
        ours.append(timed(plait_step, args.steps))
        theirs.append(timed(coca_step, args.steps))
    ratios = [a / b for a, b in zip(ours, theirs)]
    print(f"batch {args.batch}, {args.rounds} rounds x {args.steps} steps, torch {torch.__version__}, "
          f"open_clip {open_clip.__version__}, {torch.get_num_threads()} threads")
    print(f"plait caption step   {statistics.median(ours) * 1e3:7.1f} ms")
    print(f"open_clip CoCa step  {statistics.median(theirs) * 1e3:7.1f} ms")
    print(f"plait / open_clip    {statistics.median(ratios):7.2f}x (median of rounds' ratios)")
    return 0


def generation_speed(args) -> int:
    torch.manual_seed(0)
    model = build_model(model_config("fmnist-vit"), ObjectiveConfig(caption={"weight": 2.0})).eval()
    captioner = captioner_for(model)
    images = torch.randn(args.batch, 3, 28, 28)
    print(f"fmnist-vit + {len(model.heads['caption'].resblocks)}-block decoder, batch {args.batch}, "
          f"{args.rounds} rounds, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'decoding':10s} {'max length':>10s} {'mean length':>11s} {'captions/s':>10s} {'ms/batch':>9s} "
          f"{'captions/CPU-s':>14s}")
    for max_length in args.max_length:
        min_length = min(5, max_length - 1)
        for name, decode in (("greedy", lambda: greedy(captioner, images, max_length, min_length)),
                             (f"beam {args.beams}", lambda: beam_search(captioner, images, args.beams, max_length,
                                                                       min_length))):
            ids = decode()                                   # warm-up, and the captions' length
            times, cpu = [], []
            for _ in range(args.rounds):
                start, start_cpu = time.perf_counter(), time.process_time()
                decode()
                times.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
            length = float((ids != 0).sum(1).float().mean())
            t, c = statistics.median(times), statistics.median(cpu)
            # captions per CPU-second (this process, all threads): robust to other jobs on a shared machine
            print(f"{name:10s} {max_length:10d} {length:11.1f} {args.batch / t:10.1f} {t * 1e3:9.0f} "
                  f"{args.batch / c:14.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
