"""Config schema, YAML + override merging, and the errors for unknown keys and bad values."""
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from attnlab.engine.config import load_config, schema, valid_keys
from attnlab.errors import AttnlabError
from attnlab.objectives import Objective, _OBJECTIVES, objective_defaults, register_objective
from attnlab.search.pipeline import load_pipeline

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_then_yaml_then_overrides(tmp_path):
    path = write(tmp_path, "seed: 3\ntrain:\n  lr: 0.2\n  epochs: 7\nmodel:\n  attention: se\n")
    cfg = load_config(path, ["train.lr=0.05", "model.attention_kwargs.reduction=8", "model.blocks=[1,2]"])
    assert cfg.name == "recipe"  # the file's stem when the recipe names no run
    assert cfg.seed == 3 and cfg.train.epochs == 7  # from the YAML
    assert cfg.train.lr == 0.05  # the override wins over the YAML
    assert cfg.model.attention == "se" and cfg.model.attention_kwargs == {"reduction": 8}
    assert list(cfg.model.blocks) == [1, 2]
    assert cfg.train.momentum == 0.9 and cfg.model.num_classes is None  # untouched defaults


def test_typed_values_are_converted_or_rejected(tmp_path):
    cfg = load_config(None, ["train.lr=1", "train.epochs=4", "train.amp=false"])
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 1.0
    assert cfg.train.amp == "off"  # a boolean amp maps onto the dtype choices
    with pytest.raises(AttnlabError, match=r"train\.epochs"):
        load_config(None, ["train.epochs=many"])
    with pytest.raises(AttnlabError, match=r"train\.lr"):
        load_config(write(tmp_path, "train:\n  lr: fast\n"))
    with pytest.raises(AttnlabError, match="schedule"):
        load_config(None, ["train.schedule=exponential"])
    with pytest.raises(AttnlabError, match="device"):
        load_config(None, ["device=gpu"])
    with pytest.raises(AttnlabError, match="key=value"):
        load_config(None, ["train.lr"])


@pytest.mark.parametrize("where", ["yaml", "override"])
def test_unknown_key_names_it_and_the_closest_keys(tmp_path, where):
    if where == "yaml":
        args = (write(tmp_path, "train:\n  lr: 0.1\n  wieght_decay: 0.001\n"), ())
    else:
        args = (None, ["train.wieght_decay=0.001"])
    with pytest.raises(AttnlabError) as info:
        load_config(*args)
    msg = str(info.value)
    assert "train.wieght_decay" in msg and "train.weight_decay" in msg and "\n" not in msg


def test_unknown_top_level_section_suggests_the_real_one():
    with pytest.raises(AttnlabError, match=r"'trian'.*closest valid keys: train"):
        load_config(None, ["trian.lr=0.1"])


def test_free_form_sections_take_any_key_but_typed_ones_do_not():
    cfg = load_config(None, ["model.attention_kwargs.kernel_size=5", "model.blocks={2: all}"])
    cfg = load_config(None, ["model.blocks.3=all"], base=cfg)  # a saved config plus overrides, as resume does
    assert cfg.model.attention_kwargs.kernel_size == 5
    assert {str(k): v for k, v in cfg.model.blocks.items()} == {"2": "all", "3": "all"}
    with pytest.raises(AttnlabError, match="train.ema.decai"):
        load_config(None, ["train.ema.decai=0.9"])


def test_every_registered_objective_owns_a_typed_section():
    keys = set(valid_keys(schema()))
    for name, defaults in objective_defaults().items():
        assert name in keys
        assert {f"{name}.{k}" for k in defaults} <= keys


def test_a_newly_registered_objective_gets_a_checked_section():
    @register_objective("tiny_cfg_probe", defaults={"enabled": False, "weight": 0.5, "mode": "a"})
    class Probe(Objective):
        pass
    try:
        cfg = load_config(None, ["tiny_cfg_probe.enabled=true", "tiny_cfg_probe.weight=2"])
        assert cfg.tiny_cfg_probe.enabled is True and cfg.tiny_cfg_probe.weight == 2.0
        with pytest.raises(AttnlabError, match="tiny_cfg_probe.weight"):
            load_config(None, ["tiny_cfg_probe.weight=heavy"])
        with pytest.raises(AttnlabError, match="tiny_cfg_probe.wieght"):
            load_config(None, ["tiny_cfg_probe.wieght=1"])
    finally:
        _OBJECTIVES.pop("tiny_cfg_probe")


@pytest.mark.parametrize("load", [load_config, load_pipeline], ids=["train", "search"])
def test_missing_or_malformed_recipe(tmp_path, load):
    """Train and search read recipes through one reader: the same one-line message for each bad file."""
    with pytest.raises(AttnlabError, match="does not exist"):
        load(tmp_path / "nope.yaml")
    with pytest.raises(AttnlabError, match=f"config file '{tmp_path}' is a folder, not a YAML file"):
        load(tmp_path)
    # The problem's wording is the YAML parser's (libyaml or pure Python); where it is, is ours.
    with pytest.raises(AttnlabError, match=r"cannot read config .*: .* at line 2, column 1 \(while parsing a flow "
                                           r"sequence begun at line 1, column 8\)$"):
        load(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(AttnlabError, match="mapping"):
        load(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(AttnlabError, match="is empty; give a recipe"):
        load(write(tmp_path, "# nothing set yet\n"))


@pytest.mark.parametrize("overrides, message", [
    (["train.nesterov=true", "train.momentum=0"], "train.nesterov=true needs train.momentum > 0, got 0"),
    (["seed=-1"], "seed must be >= 0, got -1"),
    (["data.image_size=0"], "data.image_size must be >= 1 (or null: the dataset's own size), got 0"),
])
def test_settings_that_would_be_ignored_are_refused(overrides, message):
    with pytest.raises(AttnlabError, match=re.escape(message)):
        load_config(None, overrides)


@pytest.mark.parametrize("override, message", [
    ("train.lr=nan", "train.lr must be a finite number > 0, got nan"),
    ("train.lr=inf", "train.lr must be a finite number > 0, got inf"),
    ("train.weight_decay=-1", "train.weight_decay must be a finite number >= 0, got -1.0"),
    ("train.momentum=nan", "train.momentum must be a finite number in [0, 1), got nan"),
    ("train.gamma=-1", "train.gamma must be a finite number > 0, got -1.0"),
    ("train.warmup_epochs=nan", "train.warmup_epochs must be a finite number in [0, train.epochs], got nan"),
    ("train.ema.decay=1", "train.ema.decay must be a finite number in [0, 1), got 1.0"),
])
def test_hyperparameters_that_are_not_finite_or_out_of_range_are_refused(override, message):
    """NaN compares false with every bound, so each bound is checked as a condition that must hold."""
    with pytest.raises(AttnlabError, match=re.escape(message) + "$"):
        load_config(None, ["train.nesterov=false", override])


def test_options_of_an_objective_that_is_off_are_checked_when_a_run_starts_not_when_it_loads():
    from attnlab.engine.config import refuse_ignored_settings
    saved = load_config(None, ["ssia.design=cam", "ssia.map=channel"])  # loads: a saved run may hold it, and resumes
    with pytest.raises(AttnlabError, match="ssia design=cam needs map=spatial"):
        refuse_ignored_settings(saved)
    with pytest.raises(AttnlabError, match="unknown ssia design 'foo'"):
        refuse_ignored_settings(load_config(None, ["ssia.design=foo"]))


def test_milestones_outside_multistep_are_refused_when_a_run_starts_not_when_it_resumes(tmp_path):
    from attnlab.engine.config import refuse_ignored_settings
    from attnlab.engine.train import resume_config, train
    cfg = load_config(None, ["train.milestones=[1,2]", f"out_dir={tmp_path}", "name=old"])  # loads: a saved run
    message = "train.milestones are read by train.schedule=multistep only, not by cosine"
    with pytest.raises(AttnlabError, match=re.escape(message)):
        refuse_ignored_settings(cfg)
    with pytest.raises(AttnlabError, match=re.escape(message)):
        train(cfg)  # a fresh run: refused before anything is written
    assert not (tmp_path / "old").exists()
    # A run saved with them (and with a name from before names had to be plain) still resumes.
    run = tmp_path / "old"
    run.mkdir()
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg).replace("name: old", "name: exp/old"))
    assert resume_config(run).name == "old" and list(resume_config(run).train.milestones) == [1, 2]


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", "."])
def test_a_run_name_that_is_not_a_plain_folder_name_is_refused(name):
    """The run dir is out_dir/name: a name with a path in it would put the run outside out_dir."""
    with pytest.raises(AttnlabError, match=f"name must be a plain folder name .*got {re.escape(repr(name))}"):
        load_config(None, [f"name={name}"])


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_recipes_load(recipe):
    cfg = load_config(ROOT / "configs" / recipe)
    assert cfg.name == Path(recipe).stem
    assert OmegaConf.to_yaml(cfg)  # fully resolvable


def test_cli_reports_an_unknown_key_on_one_line(capsys):
    from attnlab.cli import main
    with pytest.raises(SystemExit) as info:
        main(["train", "--config", str(ROOT / "configs" / "quick.yaml"), "train.epocs=2"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnlab: error: unknown config key 'train.epocs'") and "train.epochs" in err
    assert len(err.splitlines()) == 1


def test_a_search_recipe_given_to_train_says_which_command_runs_it():
    recipe = ROOT / "configs" / "search" / "ean_resnet20_se.yaml"
    with pytest.raises(AttnlabError, match=r"is a search recipe \(it has supernet, search, retrain\): run it with "
                                           r"attnlab search --config .*ean_resnet20_se\.yaml$"):
        load_config(recipe)


def test_an_unknown_attention_is_refused_when_the_config_loads():
    """Said before any image is decoded (the run failed only once the test split had been read)."""
    with pytest.raises(AttnlabError, match="unknown attention 'nosuch'; valid choices: bam, cbam"):
        load_config(None, ["model.attention=nosuch"])


def test_an_interpolation_that_cannot_resolve_is_one_line(tmp_path):
    recipe = tmp_path / "loop.yaml"
    recipe.write_text("name: ${name}\n")
    with pytest.raises(AttnlabError, match="^cannot resolve config: Recursive interpolation detected$"):
        load_config(recipe)
