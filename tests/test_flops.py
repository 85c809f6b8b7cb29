"""Analytic parameter and multiply-add counts per layer (REFERENCE.md section 1 and 2)."""


import forkserver

from alexnet_jax import flops
from alexnet_jax.model import AlexNet


def _split(rows):
    p = sum(r.params for r in rows)
    m = sum(r.macs for r in rows)
    conv_m = sum(r.macs for r in rows if r.name.startswith("conv")) / m
    fc_p = sum(r.params for r in rows if r.name.startswith("fc")) / p
    return p, m, conv_m, fc_p


def test_paper_net_totals():
    rows = flops.layer_costs(AlexNet(variant="paper"), (224, 224, 3))
    by = {r.name: r for r in rows}
    assert by["conv1"].output == (55, 55, 96) and by["conv1"].macs == 55 * 55 * 96 * 11 * 11 * 3
    assert by["conv2"].macs == 27 * 27 * 256 * 5 * 5 * 48  # grouped: each kernel reads 48 maps
    assert by["fc6"].params == 37_752_832
    p, m, conv_m, fc_p = _split(rows)
    assert p == 60_965_224
    assert m == 724_406_816  # 724.4M MAC
    assert 0.90 < conv_m < 0.93 and 0.95 < fc_p < 0.97


def test_without_groups_and_torchvision_variant():
    _, m, _, _ = _split(flops.layer_costs(AlexNet(variant="paper", groups=1), (224, 224, 3)))
    assert round(m / 1e6) == 1135  # 1.135G MAC without the two-GPU split
    p, m, _, _ = _split(flops.layer_costs(AlexNet(variant="owt"), (224, 224, 3)))
    assert p == 61_100_840 and round(m / 1e6) == 714  # torchvision: 0.714 GMAC


def test_cli_prints_table_and_draws_chart(tmp_path, python, repo):
    png = tmp_path / "flops.png"
    r = forkserver.run([python, "-m", "alexnet_jax.flops", "--config", "configs/imagenet.py", "--plot", str(png)],
                       cwd=repo, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "60,965,224" in r.stdout and "724,406,816" in r.stdout
    assert "91.9%" in r.stdout and "96.2%" in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
