"""Published figures of the paper, as data (used by the paper-number tests and
benchmarks/plot_resolution_sweeps.py).

GMACs are the paper's "#FLOPs" column (the paper counts multiply-accumulates, reference §4).
"""
from __future__ import annotations

# Appendix B, "Full Detection Results": (resolutions finest first, published GMACs).
APPENDIX_B_SWEEPS: dict[str, tuple[tuple[str, float], ...]] = {
    "piip_tsb": (
        ("896/672/448", 176), ("1120/672/448", 192), ("1344/672/448", 212), ("1120/896/448", 243),
        ("1344/896/448", 263), ("1568/896/448", 287), ("1568/896/672", 387), ("1568/1120/672", 453),
        ("1792/1120/672", 480), ("1792/1344/672", 561),
    ),
    "piip_sbl": (
        ("672/448/224", 245), ("896/448/224", 298), ("1120/448/224", 367), ("1120/672/224", 504),
        ("1120/672/448", 727), ("1344/672/448", 811), ("1344/896/448", 1002), ("1568/896/672", 1464),
        ("1568/1120/672", 1709), ("1792/1120/672", 1824),
    ),
    "piip_tsbl": (
        ("1344/896/672/448", 755), ("1568/1120/672/448", 861), ("1568/1120/896/448", 1052),
        ("1792/1344/896/448", 1180), ("1792/1568/1120/448", 1535),
    ),
}
