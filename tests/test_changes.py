"""A repository people change: the edits of the course's exercise 7 (another norm, another
activation) train, checkpoint, resume bit-identically and load back, with no new setting; what the
model computes decides the checkpoint format (model.py's top). A learned position table, saved and
loaded back without training: tests/test_model.py."""

import json

import pytest
import torch
from safetensors.torch import load_file

import data
from helpers import edited_repo, import_file, run_train

OWN_FORMAT_LINE = "checkpoints in the pico-decoder's own format, because the model is not Llama"


@pytest.mark.slow
@pytest.mark.parametrize("edit", ["layernorm", "gelu"])  # new weights (the biases); the same names, other maths
def test_an_edited_model_trains_resumes_exactly_and_loads_back(tmp_path, edit):
    repo = edited_repo(tmp_path, edit)
    runs = tmp_path / "runs"
    whole = run_train(runs, "--run_name=whole", cwd=repo)
    run_train(runs, "--run_name=cut", "--stop_at_step=2", cwd=repo)
    resumed = run_train(runs, "--run_name=cut", cwd=repo)
    for proc in (whole, resumed):  # said once at each start, with how to read the checkpoints back
        assert proc.stdout.count(OWN_FORMAT_LINE) == 1, proc.stdout[-3000:]
        assert "load_pretrained(folder) of the model.py saved in it" in proc.stdout
    assert "resumed from" in resumed.stdout

    last = runs / "whole" / "checkpoints" / "step_4"
    a = load_file(last / "model.safetensors")
    b = load_file(runs / "cut" / "checkpoints" / "step_4" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # resume is exact, to the bit
    config = json.loads((last / "config.json").read_text())
    assert config["model_type"] == "pico_decoder_own" and "lm_head.weight" not in a  # the model's own names
    assert (last / "model.py").read_text() == (repo / "model.py").read_text()
    assert "model.py" in json.loads((last / "manifest.json").read_text())["files"]

    # load_pretrained of the model.py saved with it gives the trained model: its logits equal the edited
    # model's on these weights, and its eval loss is the one the run logged at step 4
    edited = import_file(last / "model.py", f"edited_model_{edit}")
    loaded = edited.load_pretrained(str(last)).eval()
    built = edited.PicoDecoder(edited.ModelConfig(**config["pico_decoder"])).eval()
    built.load_state_dict(a)
    rows = torch.from_numpy(data.load_eval_sequences("data/demo", 64, 50304, "validation", 1))
    with torch.no_grad():
        assert torch.equal(loaded(rows[:, :-1])[0], built(rows[:, :-1])[0])
        loss = loaded(rows[:, :-1], rows[:, 1:])[1].item()
    logged = json.loads((runs / "whole" / "eval_results" / "step_4.json").read_text())["loss"]
    assert abs(loss - logged) <= 1e-5, (loss, logged)

    transformers = pytest.importorskip("transformers")  # and transformers does not load it as a Llama
    with pytest.raises((ValueError, KeyError, OSError)):
        transformers.AutoModelForCausalLM.from_pretrained(str(last))
