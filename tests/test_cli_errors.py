"""Bad commands end in one line naming the key or file, exit status 2, no traceback (issue 15)."""

from __future__ import annotations

import pytest

from pipelines.cli import main


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["preprocess", "data.modalities=[ehr,xray]"], "xray"),
        (["preprocess", "model.head.top_k=9", "model.head.num_experts=4"], "top_k"),
        (["preprocess", "data.root=/nonexistent/corpus"], "/nonexistent/corpus"),
        (["preprocess", "data.nope=1"], "data.nope"),
        (["evaluate", "--checkpoint", "/nonexistent/best.pt"], "/nonexistent/best.pt"),
    ],
)
def test_bad_command_is_one_line(argv, needle, capsys):
    assert main(["--log-level", "WARNING", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0]


def test_corrupt_checkpoint_is_named(tmp_path, capsys):
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"not a checkpoint")
    (tmp_path / "config.yaml").write_text("{}\n")
    assert main(["--log-level", "WARNING", "evaluate", "--checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(ckpt) in err[0]
