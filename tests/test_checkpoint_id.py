"""busseg.checkpoint_id: one torch-free definition of a checkpoint's folder and identity."""

import os
import subprocess
import sys

import pytest

from busseg.checkpoint_id import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    checkpoint_dir,
    checkpoint_identity,
    default_checkpoint_dir,
    files_key,
)


def test_imports_without_torch():
    code = ("import sys; import busseg.checkpoint_id; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_same_names_and_default_as_models():
    from busseg.models import checkpoint as ckpt
    from busseg.models import default_checkpoint_path

    assert (CONFIG_NAME, WEIGHTS_NAME) == (ckpt.CONFIG_NAME, ckpt.WEIGHTS_NAME)
    assert default_checkpoint_dir() == default_checkpoint_path()
    assert checkpoint_dir(None) == default_checkpoint_path().resolve()


def test_folder_or_either_file_is_the_same_checkpoint(tiny_checkpoint):
    folder = tiny_checkpoint.resolve()
    for given in (tiny_checkpoint, tiny_checkpoint / CONFIG_NAME, tiny_checkpoint / WEIGHTS_NAME):
        assert checkpoint_dir(given) == folder
        assert checkpoint_identity(given) == (str(folder), files_key(folder))
    key = files_key(folder)
    assert len(key) == 2 and all(len(k) == 3 for k in key)


def test_is_the_model_cache_and_ranking_key(tiny_checkpoint):
    from busseg.inference import load_model
    from busseg.uncertainty import checkpoint_key

    model = load_model(tiny_checkpoint, device="cpu")
    assert model.busseg_checkpoint_path == checkpoint_identity(tiny_checkpoint)[0]
    assert checkpoint_key(model) == checkpoint_identity(tiny_checkpoint)


def test_rewritten_checkpoint_gets_a_new_identity(tiny_checkpoint):
    before = checkpoint_identity(tiny_checkpoint)
    config = tiny_checkpoint / CONFIG_NAME
    st = config.stat()
    os.utime(config, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert checkpoint_identity(tiny_checkpoint) != before


def test_missing_files(tmp_path):
    from busseg.models import CheckpointError

    with pytest.raises(OSError):
        checkpoint_identity(tmp_path)
    with pytest.raises(CheckpointError):
        checkpoint_identity(tmp_path, explain=True)
