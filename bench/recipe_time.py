"""Expected training time of each recipe on one node, from img/s at each train size.

A recipe's epochs run at the sizes its resolution schedule gives (FFCV's fast recipes at 160 px, ramping to
192 px; NVIDIA's at 224 px), so its time is the sum over epochs of images / img/s at that epoch's size. The
img/s at 224 px is an anchor (NVIDIA's 16,621 img/s on a DGX A100 by default); the other sizes are scaled by
ratios to it, measured with `launch.py bench train --image-sizes 160 192 224` on the target machine or, as a
rough guide, on a CPU (where the step's cost follows the pixel count more closely than on a GPU).

    python bench/recipe_time.py --ratio 160=2.0 --ratio 192=1.4 [--anchor 16621] [--images 1281167]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rn50_ray.config import load_config
from rn50_ray.core.run_plan import plan_run

RECIPES = ("rn50_fast_16e", "rn50_fast_24e", "rn50_fast_88e", "rn50_50e", "rn50_90e")


def epoch_sizes(recipe: str) -> list[int]:
    cfg = load_config([str(Path(__file__).resolve().parent.parent / "recipes" / f"{recipe}.yaml")])
    plan = plan_run(cfg, 1_281_167)
    return [plan.sizes.at(e) for e in range(plan.epochs)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--anchor", type=float, default=16621.0, help="img/s at 224 px on the node (default: DGX A100, AMP)")
    p.add_argument("--ratio", action="append", default=[], metavar="PX=R", help="img/s at PX over img/s at 224 px")
    p.add_argument("--images", type=int, default=1_281_167, help="train images an epoch (ImageNet-1k)")
    args = p.parse_args()
    speed = {224: args.anchor}
    for item in args.ratio:
        px, _, ratio = item.partition("=")
        speed[int(px)] = args.anchor * float(ratio)
    print(f"img/s at 224 px: {args.anchor:,.0f}; " + ", ".join(f"{px} px {s:,.0f}" for px, s in sorted(speed.items())))
    print(f"{'recipe':>14} | {'epochs':>6} | {'epochs at each size':>24} | {'train minutes':>13} | vs rn50_90e")
    sizes_of = {recipe: epoch_sizes(recipe) for recipe in RECIPES}
    minutes = {}
    for recipe, sizes in sizes_of.items():
        missing = sorted(set(sizes) - set(speed))
        if missing:
            p.error(f"{recipe} trains at {missing} px: give --ratio for each")
        minutes[recipe] = sum(args.images / speed[s] for s in sizes) / 60
    for recipe, sizes in sizes_of.items():
        counts = ", ".join(f"{sizes.count(s)} at {s}" for s in sorted(set(sizes)))
        ratio = minutes[recipe] / minutes["rn50_90e"]
        print(f"{recipe:>14} | {len(sizes):>6} | {counts:>24} | {minutes[recipe]:>13.0f} | {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
