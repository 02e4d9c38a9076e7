"""Core: config validation, seeding reproducibility, run-folder contents, the command line."""
import json, subprocess, sys
import numpy as np
import pytest
import torch
from synernet.core.config import (ConfigError, Config, RunDir, make_config, parse_cli, register_preset, seed_everything,
                           start_run, CONFIG_KEYS, PRESETS)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        make_config("base", batchsize=3)
    msg = str(e.value)
    assert "batchsize" in msg and "batch_size" in msg and "Valid keys" in msg


@pytest.mark.parametrize("key,value,expect", [
    ("dataset", "cityscape", "Valid choices: 'synthetic', 'voc', 'coco'"),
    ("scale", "huge", "Valid choices: 'demo', 'paper'"),
    ("max_iters", -5, "must be > 0"),
    ("max_iters", "many", "not a valid int"),
    ("deterministic", "maybe", "not a valid bool"),
    ("device", "tpu", "'auto', 'cpu', 'cuda', 'cuda:N'"),
])
def test_bad_values_say_what_is_valid(key, value, expect):
    with pytest.raises(ConfigError, match=expect.replace("(", r"\(").replace(")", r"\)")):
        make_config("base", **{key: value})


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="Valid presets: .*'base'"):
        make_config("no-such-preset")


def test_preset_layers_resolve_in_order():
    register_preset("_t_layers", "test", parent="base", all=dict(seed=1), demo=dict(seed=2),
                    voc=dict(seed=3), voc_demo=dict(seed=4))
    try:
        assert make_config("_t_layers").seed == 2                     # synthetic/demo: '*' then 'demo'
        assert make_config("_t_layers", dataset="voc").seed == 3      # voc/paper: 'voc' beats '*'
        assert make_config("_t_layers", dataset="voc", scale="demo").seed == 4
        assert make_config("_t_layers", dataset="voc", scale="demo", seed=9).seed == 9   # user last
        assert make_config("_t_layers", dataset="coco").batch_size == 8                  # from the parent
    finally:
        PRESETS.pop("_t_layers")


def test_preset_with_unknown_key_is_refused():
    with pytest.raises(ConfigError, match="Unknown config key 'sed'"):
        register_preset("_t_bad", "test", all=dict(sed=1))


def test_cli_strings_are_coerced_like_papermill_values():
    a = make_config(**parse_cli(["--preset", "base", "--dataset", "voc", "--max_iters", "50", "--deterministic"]))
    b = make_config("base", dataset="voc", max_iters=50, deterministic=True)
    assert a == b


def test_config_json_roundtrip(tmp_path):
    cfg = make_config("base", dataset="coco", seed=5)
    cfg.save(tmp_path / "c.json")
    assert Config.load(tmp_path / "c.json") == cfg
    (tmp_path / "bad.json").write_text(json.dumps({**cfg.to_dict(), "not_a_key": 1}))
    with pytest.raises(ConfigError, match="not_a_key"):
        Config.load(tmp_path / "bad.json")


def _tiny_training(seed, deterministic):
    seed_everything(seed, deterministic)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(net.parameters(), 1e-2)
    for _ in range(5):
        x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 2, (4,))
        loss = torch.nn.functional.cross_entropy(net(torch.nn.functional.dropout(x, 0.2)), y)
        opt.zero_grad(); loss.backward(); opt.step()
    return torch.cat([p.detach().flatten() for p in net.parameters()]), np.random.rand()


def test_seeding_reproduces_a_training_bit_for_bit():
    try:
        a, ra = _tiny_training(3, True)
        b, rb = _tiny_training(3, True)
        c, _ = _tiny_training(4, True)
    finally:
        seed_everything(0, False)
    assert torch.equal(a, b) and ra == rb
    assert not torch.equal(a, c)


def test_run_folder_contents(tmp_path):
    cfg = make_config("base", out_dir=str(tmp_path / "run"), max_iters=7)
    run, device, log = start_run(cfg)
    run.log_metrics(1, loss=1.5)
    run.write_summary(dict(preset=cfg.preset, seg_miou=12.0))
    files = {p.name for p in run.path.iterdir()}
    assert {"config.json", "env.json", "metrics.jsonl", "summary.json", "log.txt", "checkpoints"} <= files
    env = json.loads((run.path / "env.json").read_text())["starts"][0]
    assert env["packages"]["torch"].startswith(torch.__version__.split("+")[0])
    assert env["device"] == str(device) and "commit" in env["git"] and env["python"]
    assert json.loads((run.path / "config.json").read_text())["max_iters"] == 7
    # same config: resumes; another config: refused with the differing key named
    assert RunDir(cfg).resumed
    with pytest.raises(ConfigError, match="seed"):
        RunDir(cfg.replace(seed=1))


def test_command_line_entry_point(tmp_path):
    out = subprocess.run([sys.executable, "-m", "synernet.core", "--preset", "base", "--out_dir",
                          str(tmp_path / "r"), "--max_iters", "3"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout[out.stdout.index("{"):])["max_iters"] == 3
    bad = subprocess.run([sys.executable, "-m", "synernet.core", "--max_iter", "3"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0 and "Did you mean 'max_iters'" in bad.stderr
