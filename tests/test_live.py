import json
from pathlib import Path

from stages.lib.live import open_live


def test_each_stage_gets_its_own_live_directory(workdir):
    live = open_live(Path("plots/sft/persona"))
    for step, loss in enumerate([2.0, 1.5, 1.2]):
        live.log_metric("train/loss", loss)
        live.next_step()
    live.end()

    stage_dir = workdir / "plots" / "sft" / "persona"
    assert json.loads((stage_dir / "metrics.json").read_text())["train"]["loss"] == 1.2
    rows = (stage_dir / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["step", "loss"]
    assert [float(r.split("\t")[1]) for r in rows[1:]] == [2.0, 1.5, 1.2]
    # DVC's files are ours to declare: DVCLive writes no dvc.yaml and no shared ./dvclive.
    assert not (workdir / "dvclive").exists()
    assert not (workdir / "dvc.yaml").exists() and not (stage_dir / "dvc.yaml").exists()
