"""`megapile plot`: one PNG with several runs overlaid; a partial last line is skipped; a wrong dir is one line."""
import json

from megapile.cli import main
from megapile.reporting.plot import read_metrics


def _run(tmp_path, name, scale):
    run = tmp_path / name
    run.mkdir()
    lines = [json.dumps({"step": s, "loss": scale / s, "lr": 1e-3, "tokens_per_s": 1000.0 * scale,
                         **({"val_loss": scale / s} if s % 5 == 0 else {})}) for s in range(1, 11)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 11, "lo')  # killed mid-write
    return str(run)


def test_plot_overlays_runs(tmp_path, capsys):
    a, b = _run(tmp_path, "a", 1.0), _run(tmp_path, "b", 2.0)
    assert len(read_metrics(a)) == 10
    out = tmp_path / "plots" / "loss.png"
    assert main(["plot", a, b, "--output", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert main(["plot", str(tmp_path / "missing")]) == 1
    assert "megapile: error:" in capsys.readouterr().err
