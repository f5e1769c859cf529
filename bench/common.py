"""What several benchmarks share: the full-size demo images they all measure on."""

from __future__ import annotations

import tempfile
from pathlib import Path

from pneumo_dist import demo

CACHE = Path(tempfile.gettempdir()) / "pneumo-bench-fullsize-demo"
SHARED_KAGGLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray_224"


def full_size_demo(count: int) -> list[Path]:
    """`count` demo X-rays of 1-3 MP in the Kaggle layout (3/4 train, 1/4 test), generated once."""
    root = CACHE / str(count)
    if not (root / "done").exists():
        per_class = count // 4
        spec = demo.DemoSpec(
            images_per_class=(("train", per_class * 3 // 2), ("test", per_class // 2)),
            min_side_px=900,
            max_side_px=1500,
        )
        print(f"generating {count} demo images of 1-3 MP in {root} (once)...", flush=True)
        demo.write_demo_dataset(str(root), spec)
        (root / "done").touch()
    return sorted(p for p in root.rglob("*.jpeg"))
