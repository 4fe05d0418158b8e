"""Every published #Param / #FLOPs figure, checked against the paper-convention counter.

Each row names its source (paper table and row, or the authors' README as quoted in the reference
notes §3.5), the registered variant and overrides, and the published figures (params in M = 1e6,
FLOPs in G = 1e9 multiply-accumulates). A figure passes when the counter is within 0.5% of it.
Figures the documented rules cannot reproduce stay in the table as strict xfails giving the
measured value and the most likely reason.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from piip.analysis.paper_flops import paper_complexity
from piip.analysis.paper_tables import APPENDIX_B_SWEEPS
from piip.config.model import BranchConfig, PIIPConfig
from piip.models.registry import get_config

REL_TOL = 0.005


@dataclasses.dataclass(frozen=True)
class Row:
    source: str
    variant: str
    resolutions: str | None = None
    params_m: float | None = None
    gflops: float | None = None
    task: str = "det"
    interactions: int | None = None
    attn: str | None = None
    window_padding: bool = True          # counter option (False: the paper's Table 3 InternViT rows)
    xfail_params: str | None = None
    xfail_flops: str | None = None

    def config(self):
        return get_config(self.variant, task=self.task, resolutions=self.resolutions,
                          interactions=self.interactions, interaction_attn=self.attn)

    def label(self) -> str:
        extra = "".join(f"-{v}" for v in (self.resolutions, self.interactions, self.attn) if v is not None)
        return f"{self.source} [{self.variant}{extra}]"


def _rows(source: str, variant: str, entries, **common: Any) -> list[Row]:
    return [Row(source, variant, res, p, f, **common) for res, p, f in entries]


# Window attention differences: Table 3 was counted by the authors' internal codebase, which ran
# InternViT with window attention and did not count padded windows (see paper_complexity).
_LH6B_GAP = ("a constant gap (1610G for every detection row, 402G = 1/4 of it for every "
             "segmentation row, whose ViT-H/ViT-L token counts are 1/4) that does not depend on the 6B "
             "resolution: the 6B branch is counted alike (the 256->512->640 steps and the 6B baseline "
             "match to 0.1%), so the difference sits on the ViT-H/ViT-L side (their branches, the H-L "
             "interactions or the H-side terms of the 6B-H interactions); the parameters match, so it is "
             "an unstated setting that changes compute but not weights, e.g. a lower ViT-L input size "
             "(L at half the listed size with global attention matches detection within 0.2% but leaves "
             "segmentation 1.3% low, so it is not the whole story)")

ROWS: list[Row] = [
    # -- Table 1 -------------------------------------------------------------------------------
    Row("Table 1: ViTDet-B", "vitdet_base", "1024", 90, 463),
    *_rows("Table 1: PIIP-TSB", "piip_tsb", [
        ("1120/896/448", 146, 243), ("1568/896/448", 147, 287), ("1568/1120/672", 149, 453)]),
    Row("Table 1: ViTDet-L", "vitdet_large", "1024", 308, 1542),
    *_rows("Table 1: PIIP-SBL", "piip_sbl", [
        ("1120/672/448", 493, 727), ("1344/896/448", 495, 1002), ("1568/896/672", 497, 1464)]),
    *_rows("Table 1: PIIP-TSBL", "piip_tsbl", [
        ("1344/896/672/448", 506, 755), ("1568/1120/672/448", 507, 861),
        ("1792/1568/1120/448", 512, 1535)]),
    # -- Appendix B sweeps (FLOPs only); for PIIP-SBL 672/448/224 etc., ViT-L at 224 has a 14x14
    # grid smaller than its window 28, which the published count treats as global attention -----
    *(Row(f"Appendix B: {name}", name, res, None, gflops)
      for name, rows in APPENDIX_B_SWEEPS.items() for res, gflops in rows),
    # -- Table 10: PIIP-TSB 1120/896/448, number of interactions x attention type --------------
    *[Row(f"Table 10: deformable, {n} interactions", "piip_tsb", "1120/896/448", None, f,
          interactions=n, attn="deform")
      for n, f in [(0, 176), (1, 182), (2, 187), (4, 198), (6, 210), (12, 243)]],
    *[Row(f"Table 10: regular, {n} interactions", "piip_tsb", "1120/896/448", None, f,
          interactions=n, attn="regular")
      for n, f in [(0, 176), (1, 211), (2, 245), (4, 315), (6, 384), (12, 592)]],
    # -- Table 9: parameter-inverted vs other pyramids -----------------------------------------
    Row("Table 9: Fig. 1(a) B", "vitdet_base", "1024", 90, 463),
    Row("Table 9: Fig. 1(b) B, multi-scale training", "vitdet_base", "1024", 90, 463),
    Row("Table 9: BBB IP, no interactions", "piip_bbb", "896/448/224", 262, 369, interactions=0),
    Row("Table 9: BBB IP, no interactions", "piip_bbb", "896/672/224", 263, 457, interactions=0),
    Row("Table 9: Fig. 1(c) BBB IP + Inter.", "piip_bbb", "896/448/224", 341, 466),
    Row("Table 9: TSB same resolution", "piip_tsb", "896/896/896", 148, 468),
    Row("Table 9: Fig. 1(d) TSB parameter-direct", "piip_tsb_direct", "448/672/896", 147, 452),
    Row("Table 9: Fig. 1(e) TSB", "piip_tsb", "1568/1120/672", 149, 453),
    Row("Table 9: Fig. 1(a) L", "vitdet_large", "1024", 308, 1542),
    Row("Table 9: Fig. 1(c) LLL", "piip_lll", "896/448/224", 1053, 1458),
    Row("Table 9: SBL same resolution", "piip_sbl", "848/848/848", 495, 1539),
    Row("Table 9: Fig. 1(e) SBL", "piip_sbl", "1568/896/672", 497, 1464),
    # -- Table 3: InternViT-6B scale (paper; window attention, unpadded count) -----------------
    Row("Table 3: InternViT-6B, Mask R-CNN", "internvit_6b_window", "1024", 5919, 24418,
        window_padding=False),
    *[Row("Table 3: PIIP-LH6B, Mask R-CNN", "piip_lh6b", res, p, f, window_padding=False,
          xfail_flops=f"measured {m}G vs published {f}G: {_LH6B_GAP}")
      for res, p, f, m in [("1280/1024/256", 7269, 5643, 7254), ("1280/1024/512", 7271, 10368, 11978),
                           ("1280/1024/640", 7273, 13911, 15521)]],
    Row("Table 3: InternViT-6B, UperNet 512", "internvit_6b_window", "512", None, 6105,
        window_padding=False),
    *[Row("Table 3: PIIP-LH6B, UperNet", "piip_lh6b", res, None, f, window_padding=False,
          xfail_flops=f"measured {m}G vs published {f}G: {_LH6B_GAP}")
      for res, f, m in [("640/512/192", 1903, 2303), ("640/512/256", 2592, 2994),
                        ("640/512/384", 4560, 4963)]],
    # -- classification (§4.4 / Table 8; README figures, reference §3.5) -----------------------
    Row("Table 8 / README: PIIP-TSB cls", "piip_tsb", "368/192/128", 144, 17.4, task="cls"),
    Row("Table 8 / README: PIIP-SBL cls", "piip_sbl", "320/160/96", 489, 39.0, task="cls"),
    Row("Table 8 / README: PIIP-SBL cls", "piip_sbl", "384/192/128", 489, 61.2, task="cls"),
    Row("§4.4 text: DeiT baseline ViT-L (vs PIIP-SBL 39.0G)", "vitdet_large", "224", None, 61.6,
        task="cls"),
    # -- Appendix C: from-scratch PIIP-B -------------------------------------------------------
    Row("Appendix C: ViT-B (our impl.)", "vitdet_base", "224", 86, 17.5, task="cls",
        xfail_params="measured 86.59M vs published 86M: ViT-B/16 has 86.6M parameters; the "
                     "published figure is truncated, not rounded"),
    Row("Appendix C: PIIP-B", "piip_b_scratch", "512/256/128", 100.3, 18.4, task="cls",
        xfail_params="measured 100.96M vs published 100.3M: the published total leaves out the "
                     "1000-way classifier (640*1000+1000 = 0.64M; without it 100.32M), as does "
                     "Appendix C's per-module table (which sums to 100.3M)"),
    # -- authors' README (reference §3.5), same counting script -------------------------------
    Row("README: AugReg PIIP-SBL", "piip_sbl_augreg", "1568/1120/672", 498, 1874),
    Row("README: AugReg PIIP-SBL speedup", "piip_sbl_augreg_speedup", "1568/1120/672", 470, 1741),
    Row("README: InternViT-6B (global attention)", "internvit_6b", "1024", 5919, 29323),
    Row("README: PIIP-H6B", "piip_h6b", "1024/512", 6872, 11080),
    Row("README: PIIP-H6B speedup", "piip_h6b_speedup", "1024/512", 6752, 10692),
    Row("README: UperNet InternViT-6B 512", "internvit_6b", "512", 5910, 6364),
    *_rows("README: UperNet PIIP-H6B (no proj/norm, fused MLP)", "piip_h6b_speedup", [
        ("512/192", 6745, 1663), ("512/256", 6745, 2354), ("512/384", 6746, 4374),
        ("512/512", 6747, 7308)]),
]


def _cases():
    cases = []
    for row in ROWS:
        for metric, published, reason in (("params", row.params_m, row.xfail_params),
                                          ("flops", row.gflops, row.xfail_flops)):
            if published is None:
                continue
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            cases.append(pytest.param(row, metric, id=f"{row.label()} {metric}", marks=marks))
    return cases


@pytest.mark.parametrize("row, metric", _cases())
def test_published_figure(row: Row, metric: str) -> None:
    result = paper_complexity(row.config(), window_padding=row.window_padding)
    if metric == "params":
        measured, published, unit = result.params / 1e6, row.params_m, "M"
    else:
        measured, published, unit = result.macs / 1e9, row.gflops, "G"
    assert measured == pytest.approx(published, rel=REL_TOL), (
        f"{row.label()}: measured {measured:.2f}{unit} vs published {published}{unit}")


# -- Appendix C per-module table: figures printed to 0.1, so they must round to the printed value --

APPENDIX_C_MODULES = [
    # part, published params (M), published FLOPs (G), xfail reason for FLOPs
    ("branch1", 59.6, 3.8, "measured 3.87G vs published 3.8G: linears alone are 3.775G, patch "
                           "embedding 0.031G and attention 0.063G; the published figure likely "
                           "leaves out one of these small terms (or truncates)"),
    ("branch2", 15.1, 4.3, None),
    ("branch3", 4.0, 4.9, None),
    ("interactions", 21.2, 5.1, None),
    ("merge", 0.3, 0.2, None),
]


def _module_cases():
    cases = []
    for part, p, f, reason in APPENDIX_C_MODULES:
        cases.append(pytest.param(part, "params", p, id=f"Appendix C {part} params"))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        cases.append(pytest.param(part, "flops", f, id=f"Appendix C {part} flops", marks=marks))
    return cases


@pytest.mark.parametrize("part, metric, published", _module_cases())
def test_appendix_c_modules(part: str, metric: str, published: float) -> None:
    result = paper_complexity(get_config("piip_b_scratch", task="cls"))
    p = result.part(part)
    measured = p.params / 1e6 if metric == "params" else p.macs / 1e9
    assert round(measured, 1) == pytest.approx(published), (
        f"Appendix C {part}: measured {measured:.3f} vs published {published}")


# -- the reference's worked example (§4.3): exact proxy parameter count and breakdown ------------

def test_worked_example_tsb_1120_896_448() -> None:
    result = paper_complexity(get_config("piip_tsb"))
    assert result.params == 146_441_707          # counted on the authors' proxy model [ran]
    gm = {p.name: p.macs / 1e9 for p in result.parts}
    mp = {p.name: p.params / 1e6 for p in result.parts}
    # branch linears/LNs/patch embed + attention terms
    assert gm["branch1"] == pytest.approx(67.08 + 2.83, abs=0.01)
    assert gm["branch2"] == pytest.approx(67.57 + 5.66, abs=0.01)
    assert gm["branch3"] == pytest.approx(26.78 + 4.43, abs=0.01)
    assert gm["interactions"] == pytest.approx(66.15 + 0.95, abs=0.01)
    assert gm["merge"] + gm["head"] == pytest.approx(1.67, abs=0.01)
    deform = dict((n, m) for n, _, m in result.part("interactions").items)["attn_core"]
    assert deform / 1e9 == pytest.approx(0.95, abs=0.01)
    assert mp["branch1"] == pytest.approx(86.27, abs=0.01)
    assert mp["branch2"] == pytest.approx(22.80, abs=0.01)
    assert mp["branch3"] == pytest.approx(6.43, abs=0.01)
    assert mp["interactions"] == pytest.approx(29.72, abs=0.01)
    assert mp["merge"] == pytest.approx(0.45, abs=0.01)
    assert mp["head"] == pytest.approx(0.77, abs=0.01)
    assert result.macs / 1e9 == pytest.approx(243.13, abs=0.01)


def test_reference_analytic_figures() -> None:
    """Figures the reference computed with the same closed-form rules (§3.5, §4.3)."""
    cases = {
        ("vitdet_base", None): (89.6, 463.41), ("vitdet_large", None): (308.4, 1541.77),
        ("internvit_6b", None): (5918.86, 29323.2), ("piip_h6b", None): (6872.34, 11079.8),
        ("piip_h6b_speedup", None): (6751.54, 10691.5), ("piip_sbl_augreg", None): (497.9, 1874.0),
        ("piip_sbl", "1568/1120/672"): (497.9, 1709.0), ("piip_sbl_384", None): (499.0, 2388.6),
    }
    for (name, res), (p, f) in cases.items():
        r = paper_complexity(get_config(name, resolutions=res))
        assert r.params / 1e6 == pytest.approx(p, abs=0.1), name
        assert r.macs / 1e9 == pytest.approx(f, abs=0.1), name


def test_per_block_windows_are_counted_block_by_block() -> None:
    """A branch with windows [2, 2, global, 4, 4, global] on a 20x20 grid (320 px at patch 16),
    counted by hand with the authors' formulas: Linear MACs on the real tokens (the InternViT
    class on the padded grid for its windowed qkv), 2*N*ws^2*D attention per windowed block,
    2*N^2*D per global block."""
    D, N = 64, 400  # a 20 x 20 grid
    windows = (2, 2, None, 4, 4, None)
    attention = sum(2 * N * (w * w if w else N) * D for w in windows)
    linear = 6 * (3 * N * D * D + N * D * D + 2 * N * D * 4 * D)
    norms = 6 * 2 * 2 * N * D
    patch = N * (3 * 16 * 16 * D + D)
    branch = BranchConfig(embed_dim=D, depth=6, num_heads=2, resolution=320, window_size=windows)
    got = paper_complexity(PIIPConfig(branches=(branch,))).part("branch1")
    assert got.macs == attention + linear + norms + patch
    # InternViT-class branches pad the grid before qkv: a 21x21 grid pads to 22x22 (window 2) and
    # 24x24 (window 4); only the qkv Linear of the windowed blocks grows
    odd = dataclasses.replace(branch, resolution=336, family="internvit")   # 21x21 grid
    n = 21 * 21
    pads = {2: 22 * 22, 4: 24 * 24}
    qkv_extra = sum(3 * (pads[w] - n) * D * D for w in windows if w)
    plain = paper_complexity(PIIPConfig(branches=(dataclasses.replace(odd, family="deit"),))).part("branch1")
    padded = paper_complexity(PIIPConfig(branches=(odd,))).part("branch1")
    assert padded.macs - plain.macs == qkv_extra


def test_windows_larger_than_grid_count_as_global() -> None:
    # SBL 672/448/224: ViT-L's 14x14 grid under window 28; the published 245G needs global attention
    r = paper_complexity(get_config("piip_sbl", resolutions="672/448/224"))
    assert r.macs / 1e9 == pytest.approx(244.78, abs=0.01)


def test_window_padding_option_only_affects_internvit_windows() -> None:
    cfg = get_config("internvit_6b_window")
    padded, unpadded = paper_complexity(cfg), paper_complexity(cfg, window_padding=False)
    assert padded.params == unpadded.params
    assert padded.macs / 1e9 == pytest.approx(25601.4, abs=0.1)     # 64x64 grid padded to 70x70
    assert unpadded.macs / 1e9 == pytest.approx(24415.9, abs=0.1)
    deit = get_config("piip_tsb")
    assert paper_complexity(deit).macs == paper_complexity(deit, window_padding=False).macs


def test_result_structure() -> None:
    r = paper_complexity(get_config("piip_tsbl"))
    names = [p.name for p in r.parts]
    assert names == ["branch1", "branch2", "branch3", "branch4", "interactions", "merge", "head"]
    assert r.params == sum(p.params for p in r.parts)
    assert r.macs == sum(p.macs for p in r.parts)
    for p in r.parts:
        assert p.params == sum(i[1] for i in p.items) and p.macs == sum(i[2] for i in p.items)
    d = r.as_dict()
    assert d["params"] == r.params and set(d["parts"]) == set(names)
    assert "total" in r.table()
    with pytest.raises(KeyError):
        r.part("nope")
    single = paper_complexity(get_config("vitdet_base"))
    assert [p.name for p in single.parts] == ["branch1", "head"]


def test_no_model_is_built_for_6b() -> None:
    import time

    start = time.perf_counter()
    r = paper_complexity(get_config("piip_lh6b"))
    assert time.perf_counter() - start < 0.5
    assert r.params > 7e9
