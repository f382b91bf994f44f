"""Tests for islet_imaging.stages and the ``islet-imaging stages`` command."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from islet_imaging.cli import main
from islet_imaging.errors import InputError, StageError
from islet_imaging.stages import (
    BUILTIN_STAGES,
    CLUSTER_INPUTS,
    CLUSTER_KINDS,
    COMPARTMENTS,
    Marker,
    QCTarget,
    StageProfile,
    StageRegistry,
    get_stage,
    iter_populations,
    list_stages,
    load_stages,
    profile_to_toml,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "stages_example.toml"

CANONICAL_MARKERS = {
    "OCT4", "SOX2", "NANOG", "SOX17", "FOXA2", "CXCR4", "HNF1B", "HNF4A", "PDX1", "NKX6.1",
    "SOX9", "NKX2.2", "NEUROD1", "CHGA", "INS", "GCG",
}  # fmt: skip

SHORT = {
    "S0": "ipsc",
    "S1": "definitive-endoderm",
    "S2": "primitive-gut-tube",
    "S3": "posterior-foregut",
    "S4": "pancreatic-progenitor",
    "S5": "endocrine-progenitor",
    "S6": "sc-islet",
}


def write(tmp_path: Path, text: str, name: str = "stages.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------- built-ins


def test_all_eight_builtins_present():
    assert [p.name for p in BUILTIN_STAGES] == [
        "ipsc",
        "definitive-endoderm",
        "endoderm-stem-cell",
        "primitive-gut-tube",
        "posterior-foregut",
        "pancreatic-progenitor",
        "endocrine-progenitor",
        "sc-islet",
    ]
    used = {m.name for p in BUILTIN_STAGES for m in p.markers}
    assert used == CANONICAL_MARKERS


@pytest.mark.parametrize("profile", BUILTIN_STAGES, ids=lambda p: p.name)
def test_builtin_profile_is_consistent(profile: StageProfile):
    assert profile.markers
    assert profile.nuclear_stain == "DAPI"
    assert profile.cluster_kind in CLUSTER_KINDS
    assert profile.cluster_input in CLUSTER_INPUTS
    for m in profile.markers:
        assert m.compartment in COMPARTMENTS
        assert m.name in CANONICAL_MARKERS
        assert profile.marker(m.name) is m
    assert profile.qc_targets
    for t in profile.qc_targets:
        assert set(t.markers) <= set(profile.marker_names)
        assert t.source, f"{profile.name} {t.population}: QC target without a source"
    for pop in profile.double_positives:
        assert len(pop.split("+")) >= 2
        assert set(pop.split("+")) <= set(profile.marker_names)
    for alias in (profile.name, *profile.aliases):
        assert get_stage(alias) is profile
        assert get_stage(alias.upper()) is profile
    lo, hi = profile.nucleus_diameter_um
    assert 0 < lo < hi
    assert profile.min_cluster_diameter_um > lo


@pytest.mark.parametrize(("alias", "name"), SHORT.items())
def test_short_aliases(alias: str, name: str):
    assert get_stage(alias).name == name
    assert get_stage(alias.lower()).name == name
    assert get_stage(alias).short_name == alias
    assert get_stage(alias).order == int(alias[1])


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("SC_Islet", "sc-islet"),
        ("sc islet", "sc-islet"),
        ("s4", "pancreatic-progenitor"),
        ("Definitive_Endoderm", "definitive-endoderm"),
        ("de", "definitive-endoderm"),
        ("IPSC", "ipsc"),
        ("enSC", "endoderm-stem-cell"),
        ("pp", "pancreatic-progenitor"),
    ],
)
def test_lookup_ignores_case_and_separators(query: str, name: str):
    assert get_stage(query).name == name


def test_get_stage_passes_profiles_through():
    p = get_stage("S6")
    assert get_stage(p) is p


def test_unknown_stage_lists_known_ones():
    with pytest.raises(StageError, match=r"unknown stage 'S9'.*sc-islet \(S6/.*--stages") as info:
        get_stage("S9")
    assert isinstance(info.value, InputError)
    for p in BUILTIN_STAGES:
        assert p.name in str(info.value)
    with pytest.raises(StageError, match="did you mean 'sc-islet'"):
        get_stage("sc-islte")


def test_list_stages_in_order():
    orders = [p.order for p in list_stages()]
    assert orders == sorted(orders)
    assert list_stages()[0].name == "ipsc"
    assert list_stages()[-1].name == "sc-islet"


def test_registry_iteration_and_membership():
    reg = StageRegistry()
    assert list(reg) == list(BUILTIN_STAGES)
    assert len(reg) == 8
    assert "S6" in reg and "sc_islet" in reg and "S9" not in reg
    assert get_stage("S4") in reg
    assert reg.find("nope") is None


def test_iter_populations():
    assert list(iter_populations(get_stage("S6"))) == [
        "INS",
        "NKX6.1",
        "GCG",
        "INS+NKX6.1",
        "INS+GCG",
    ]


def test_biology_of_key_targets():
    de = {t.population: t for t in get_stage("DE").qc_targets}
    assert de["SOX17"].minimum == 0.80
    pp = {t.population: t for t in get_stage("PP").qc_targets}
    assert pp["PDX1+NKX6.1"].minimum == 0.50
    islet = {t.population: t for t in get_stage("S6").qc_targets}
    assert (islet["INS"].minimum, islet["INS"].maximum) == (0.30, 0.60)
    assert get_stage("S6").marker("INS").compartment == "cytoplasmic"
    assert get_stage("S6").marker("NKX6.1").compartment == "nuclear"
    assert get_stage("DE").marker("CD184").name == "CXCR4"


# ---------------------------------------------------------------------------- channels


def test_match_channels_aliases():
    s6 = get_stage("S6")
    assert s6.match_channels(["Hoechst", "C-peptide", "NKX6-1", "glucagon"]) == {
        "nuclear": 0,
        "INS": 1,
        "NKX6.1": 2,
        "GCG": 3,
    }
    # order-independent, missing markers left out, unknown channels ignored, first match wins
    assert s6.match_channels(["cpep", "BF", "dapi", "DAPI", "insulin"]) == {
        "INS": 0,
        "nuclear": 2,
    }
    assert get_stage("S5").match_channels(["DAPI", "nkx2_2", "Chromogranin A"]) == {
        "nuclear": 0,
        "NKX2.2": 1,
        "CHGA": 2,
    }
    assert get_stage("S0").match_channels(["POU5F1", "Hoechst 33342"]) == {
        "OCT4": 0,
        "nuclear": 1,
    }


def test_one_unnamed_channel_is_the_nuclear_stain(tmp_path: Path) -> None:
    s0 = get_stage("S0")
    assert s0.match_channels(["C0"]) == {"nuclear": 0}
    assert s0.nuclear_channel(["C0"]) == 0
    for names in (["INS"], ["C0", "C1"], ["OCT4"]):  # named, or more than one channel
        assert "nuclear" not in s0.match_channels(names)
        with pytest.raises(InputError, match=r"img\.tif: no nuclear stain channel among"):
            s0.nuclear_channel(names, tmp_path / "img.tif")
    assert s0.match_channels(["OCT4"]) == {"OCT4": 0}


def test_marker_lookup_by_alias_and_error():
    s6 = get_stage("S6")
    assert s6.marker("c-peptide").name == "INS"
    assert s6.marker("nkx6_1").name == "NKX6.1"
    with pytest.raises(StageError, match=r"marker 'PDX1' is not part of stage 'sc-islet'"):
        s6.marker("PDX1")


# ---------------------------------------------------------------------------- QC targets


def test_qc_passes_edges_and_nan():
    t = QCTarget("INS", minimum=0.3, maximum=0.6)
    assert t.passes(0.3) is True
    assert t.passes(0.6) is True
    assert t.passes(3 / 10) is True
    assert t.passes(0.45) is True
    assert t.passes(0.2999999) is False
    assert t.passes(0.6000001) is False
    assert t.passes(float("nan")) is None
    assert t.passes(None) is None
    only_min = QCTarget("SOX17", minimum=0.8)
    assert only_min.passes(1.0) is True
    assert only_min.passes(0.79) is False
    only_max = QCTarget("GCG", maximum=0.25)
    assert only_max.passes(0.0) is True
    assert only_max.passes(0.26) is False


def test_qc_describe():
    assert QCTarget("INS", minimum=0.3, maximum=0.6).describe() == "INS+ 30%–60%"
    assert QCTarget("SOX17", minimum=0.8).describe() == "SOX17+ ≥ 80%"
    assert QCTarget("GCG", maximum=0.25).describe() == "GCG+ ≤ 25%"
    assert QCTarget("PDX1+NKX6.1", minimum=0.5).markers == ("PDX1", "NKX6.1")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "needs a minimum or a maximum"),
        ({"minimum": 80}, r"not a fraction in \[0, 1\]; write 80 % as 0.8"),
        ({"maximum": -0.1}, "not a fraction"),
        ({"minimum": 0.7, "maximum": 0.3}, "min 0.7 > max 0.3"),
        ({"minimum": "0.5"}, "must be a number"),
        ({"minimum": True}, "must be a number"),
        ({"minimum": float("nan")}, "finite"),
    ],
)
def test_qc_target_validation(kwargs, match):
    with pytest.raises(StageError, match=match):
        QCTarget("INS", **kwargs)


def test_profile_canonicalises_populations():
    p = get_stage("S6")
    q = StageProfile(
        name="x",
        aliases=(),
        order=9,
        markers=p.markers,
        cluster_kind="aggregate",
        double_positives=("c-peptide + nkx6-1",),
        qc_targets=(QCTarget("C-peptide+glucagon", maximum=0.1),),
    )
    assert q.double_positives == ("INS+NKX6.1",)
    assert q.qc_targets[0].population == "INS+GCG"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"aliases": "S9"}, "aliases must be a list of strings"),
        ({"cluster_kind": "blob"}, "cluster_kind 'blob' is not one of"),
        ({"cluster_input": "dapi"}, "cluster_input"),
        ({"order": 1.5}, "order must be an integer"),
        ({"nucleus_diameter_um": (10, 5)}, "0 < min < max"),
        ({"nucleus_diameter_um": (5,)}, r"\[min, max\]"),
        ({"min_cluster_diameter_um": 0}, "must be positive"),
        ({"double_positives": ("INS",)}, "single marker"),
        ({"double_positives": ("INS+MAFA",)}, "names marker 'MAFA'"),
        ({"qc_targets": (QCTarget("INS", 0.1), QCTarget("INS", None, 0.9))}, "repeat"),
        ({"markers": (Marker("INS", "cytoplasmic"), Marker("ins", "nuclear"))}, "share"),
        ({"markers": (Marker("DAPI", "nuclear"),)}, "nuclear stain"),
    ],
)
def test_profile_validation(kwargs, match):
    base = {
        "name": "x",
        "aliases": (),
        "order": 9,
        "markers": (Marker("INS", "cytoplasmic"), Marker("GCG", "cytoplasmic")),
        "cluster_kind": "aggregate",
    }
    with pytest.raises(StageError, match=match):
        StageProfile(**{**base, **kwargs})


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("INS", "membrane"), "compartment 'membrane' is not one of"),
        (("", "nuclear"), "must not be empty"),
        (("A+B", "nuclear"), "contains '\\+'"),
        (("INS", "cytoplasmic", "C-peptide"), "aliases must be a list of strings"),
    ],
)
def test_marker_validation(args, match):
    with pytest.raises(StageError, match=match):
        Marker(*args)


# ------------------------------------------------------------------------------------ TOML


def test_load_none_is_builtins():
    assert load_stages().profiles == BUILTIN_STAGES


def test_toml_partial_override(tmp_path):
    path = write(
        tmp_path,
        """
        [stages.S6]
        min_cluster_diameter_um = 40
        qc = [{population = "INS", min = 0.4, max = 0.7, source = "us"}]
        """,
    )
    reg = load_stages(path)
    s6 = reg.get("sc-islet")
    builtin = get_stage("sc-islet")
    assert len(reg) == 8
    assert s6.min_cluster_diameter_um == 40.0
    assert s6.qc_targets == (QCTarget("INS", 0.4, 0.7, "", "us"),)
    assert s6.markers == builtin.markers
    assert s6.aliases == builtin.aliases
    assert s6.double_positives == builtin.double_positives
    assert reg.names == StageRegistry().names  # replaced in place
    assert get_stage("S6", stages_file=path) == s6
    assert get_stage("S6") is builtin  # the built-ins are untouched


def test_toml_new_stage_with_extends(tmp_path):
    path = write(
        tmp_path,
        """
        [stages.my-beta]
        extends = "S6"
        aliases = ["S7"]
        markers = [{name = "INS", compartment = "cytoplasmic", aliases = ["C-peptide"]},
                   {name = "MAFA", compartment = "nuclear"}]
        double_positives = ["C-peptide+MAFA"]
        qc = [{population = "INS+MAFA", min = 0.1}]
        """,
    )
    reg = load_stages(path)
    p = reg.get("s7")
    assert p.name == "my-beta"
    assert p.marker_names == ("INS", "MAFA")
    assert p.double_positives == ("INS+MAFA",)
    assert p.cluster_kind == "aggregate" and p.cluster_input == "sum"  # inherited
    assert p.order == 6
    assert reg.get("S6").name == "sc-islet"  # aliases not inherited, no clash
    assert len(reg) == 9


def test_toml_new_stage_without_extends(tmp_path):
    path = write(
        tmp_path,
        """
        [stages."liver progenitor"]
        cluster_kind = "monolayer-patch"
        markers = [{name = "AFP", compartment = "cytoplasmic"}]
        """,
    )
    p = load_stages(path).get("Liver-Progenitor")
    assert p.name == "liver progenitor"
    assert p.aliases == () and p.order == 99 and p.qc_targets == ()
    assert p.nucleus_diameter_um == StageProfile.__dataclass_fields__["nucleus_diameter_um"].default


def test_toml_extends_stage_defined_earlier(tmp_path):
    path = write(
        tmp_path,
        """
        [stages.sc-islet]
        min_cluster_diameter_um = 60.0

        [stages.child]
        extends = "sc-islet"
        """,
    )
    assert load_stages(path).get("child").min_cluster_diameter_um == 60.0


def test_example_file_loads():
    reg = load_stages(EXAMPLE)
    assert reg.get("S7").name == "matured-sc-islet"
    assert reg.get("S7").marker("MAFA").compartment == "nuclear"
    assert reg.get("HP").marker("alpha-fetoprotein").name == "AFP"
    assert reg.get("S6").qc_targets[0].minimum == 0.40


@pytest.mark.parametrize("profile", BUILTIN_STAGES, ids=lambda p: p.name)
def test_toml_round_trip(tmp_path, profile):
    path = write(tmp_path, profile_to_toml(profile))
    assert load_stages(path).get(profile.name) == profile
    # renamed without aliases: a new stage equal but for the name
    renamed = (
        profile_to_toml(profile)
        .replace(f"stages.{profile.name}", "stages.copy")
        .replace(f"aliases = {list(profile.aliases)}".replace("'", '"'), "aliases = []", 1)
    )
    p = load_stages(write(tmp_path, renamed, "renamed.toml")).get("copy")
    assert p == StageProfile(**{**vars(profile), "name": "copy", "aliases": ()})


def test_toml_round_trip_of_a_custom_profile(tmp_path):
    reg = load_stages(EXAMPLE)
    text = "\n".join(profile_to_toml(p) for p in reg if p.name not in StageRegistry().names)
    again = load_stages(write(tmp_path, text))
    for name in ("matured-sc-islet", "hepatic-progenitor"):
        assert again.get(name) == reg.get(name)


def test_toml_quotes_odd_names_and_text(tmp_path):
    p = StageProfile(
        name='my "stage" 1',
        aliases=("X1",),
        order=1,
        markers=(Marker("A", "nuclear", ("a\\b",), 'quote " and\nnewline'),),
        cluster_kind="colony",
        qc_targets=(QCTarget("A", 0.1, None, "µm – ≥"),),
    )
    path = write(tmp_path, profile_to_toml(p))
    assert load_stages(path).get("X1") == p


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('[stages.S6]\ncolour = "red"\n', r"\[stages.S6\]: unknown key 'colour'.*allowed"),
        ("[stages.S6]\nqc_target = []\n", r"unknown key 'qc_target' \(did you mean 'qc'\?\)"),
        ('[stages.S6]\nname = "x"\n', "'name' is not a key"),
        ('[stages.S6]\nextends = "S4"\n', "'extends' is only for new stages"),
        (
            '[stages.S6]\nmarkers = [{name = "INS", compartment = "membrane"}]\n',
            r"\[stages.S6\]: marker 'INS': compartment 'membrane' is not one of",
        ),
        (
            '[stages.S6]\nmarkers = [{name = "INS", compartment = "cytoplasmic", colour = 1}]\n',
            r"unknown key 'colour' in markers\[0\]",
        ),
        (
            '[stages.S6]\nmarkers = [{name = "INS"}]\n',
            r"markers\[0\] needs 'name' and 'compartment'",
        ),
        ('[stages.S6]\nmarkers = "INS"\n', "markers must be a list of tables"),
        ('[stages.S6]\ncluster_kind = "blob"\n', "cluster_kind 'blob' is not one of"),
        ('[stages.S6]\nqc = [{population = "INS", min = 80}]\n', r"write 80 % as 0.8"),
        ('[stages.S6]\nqc = [{population = "INS", max = 1.5}]\n', r"not a fraction in \[0, 1\]"),
        ('[stages.S6]\nqc = [{population = "INS", min = 0.7, max = 0.3}]\n', "min 0.7 > max 0.3"),
        ('[stages.S6]\nqc = [{population = "INS", minimum = 0.3}]\n', "unknown key 'minimum'"),
        ("[stages.S6]\nqc = [{min = 0.3}]\n", r"qc\[0\] needs 'population'"),
        (
            '[stages.S6]\nqc = [{population = "INS+MAFA", min = 0.1}]\n',
            r"population 'INS\+MAFA' names marker 'MAFA', which is not one of",
        ),
        (
            '[stages.S6]\nmarkers = [{name = "INS", compartment = "cytoplasmic"}]\n',
            r"names marker 'NKX6.1'.*add the marker or fix the population",
        ),
        ('[stages.S6]\naliases = "S6"\n', "aliases must be a list of strings"),
        ("[stages.S6]\nnucleus_diameter_um = [12, 4]\n", "0 < min < max"),
        ('[stages.S6]\norder = "six"\n', "order must be an integer"),
        (
            '[stages.new]\naliases = ["S4"]\nextends = "S6"\n',
            r"'S4' is used by both 'pancreatic-progenitor' and 'new'",
        ),
        ('[stages.new]\nextends = "S9"\n', r"\[stages.new\]: unknown stage 'S9'; .*known stages"),
        ('[stages.new]\ncluster_kind = "colony"\n', "new stage 'new' needs markers"),
        ("[stages]\nS6 = 3\n", r"\[stages.S6\] must be a table"),
        ("[sc-islet]\nqc = []\n", r"unexpected top-level key\(s\) \['sc-islet'\]"),
        ("# nothing\n", r"no \[stages.<name>\] tables"),
        ("[stages.S6\nqc = \n", "not a valid TOML file"),
    ],
)
def test_toml_errors_name_file_and_fix(tmp_path, text, match):
    path = write(tmp_path, text)
    with pytest.raises(StageError, match=match) as info:
        load_stages(path)
    assert str(info.value).startswith(str(path))
    assert info.value.path == path


def test_duplicate_alias_between_two_new_stages(tmp_path):
    path = write(
        tmp_path,
        """
        [stages.a]
        extends = "S6"
        aliases = ["X"]

        [stages.b]
        extends = "S6"
        aliases = ["x"]
        """,
    )
    with pytest.raises(StageError, match=r"'x' is used by both 'a' and 'b'.*own name") as info:
        load_stages(path)
    assert info.value.path == path


def test_missing_file_and_directory(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(StageError, match="not found; give the path of a TOML file") as info:
        load_stages(missing)
    assert info.value.path == missing
    with pytest.raises(StageError, match="is not a file"):
        load_stages(tmp_path)
    with pytest.raises(StageError, match="not found"):
        get_stage("S6", stages_file=missing)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('[stages.S6]\ndescription = "µ"\n'.encode("latin-1"))
    with pytest.raises(StageError, match="not a valid TOML file"):
        load_stages(path)


# ------------------------------------------------------------------------------------- CLI


def test_cli_lists_all_stages(capsys):
    assert main(["stages"]) == 0
    out = capsys.readouterr().out
    for p in BUILTIN_STAGES:
        assert p.name in out
        assert p.cluster_kind in out
    assert "sc-islet (S6, SC-islet, islet): aggregate" in out
    assert "INS [cytoplasmic], NKX6.1 [nuclear], GCG [cytoplasmic]" in out
    assert "PDX1+NKX6.1+ ≥ 50%" in out
    assert out.index("ipsc") < out.index("pancreatic-progenitor") < out.index("sc-islet")


def test_cli_shows_one_stage(capsys):
    assert main(["stages", "s4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("pancreatic-progenitor (S4, PP)")
    assert "NKX6.1 [nuclear] (also: NKX6-1, NKX61)" in out
    assert "source: Rezania 2014" in out
    assert "sc-islet" not in out


def test_cli_toml_round_trip(tmp_path, capsys):
    assert main(["stages", "SC_Islet", "--toml"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("[stages.sc-islet]\n")
    edited = text.replace("min_cluster_diameter_um = 25.0", "min_cluster_diameter_um = 33.0")
    path = write(tmp_path, edited)
    assert load_stages(path).get("S6") == StageProfile(
        **{**vars(get_stage("S6")), "min_cluster_diameter_um": 33.0}
    )
    assert main(["stages", "S6", "--stages", str(path)]) == 0
    assert "min cluster diameter: 33 µm" in capsys.readouterr().out


def test_cli_toml_all_stages_loads_back(tmp_path, capsys):
    assert main(["stages", "--toml"]) == 0
    path = write(tmp_path, capsys.readouterr().out)
    assert load_stages(path).profiles == BUILTIN_STAGES


def test_cli_with_stages_file(capsys):
    assert main(["stages", "--stages", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "matured-sc-islet (S7, mature): aggregate" in out
    assert "INS+ 40%–70%" in out


def test_cli_bad_input_exit_code_2(tmp_path, capsys):
    assert main(["stages", "S9"]) == 2
    assert main(["stages", "--stages", str(tmp_path / "missing.toml")]) == 2
    bad = write(tmp_path, '[stages.S6]\ncluster_kind = "blob"\n')
    assert main(["stages", "--stages", str(bad)]) == 2
    assert capsys.readouterr().out == ""


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["stages", "--help"])
    assert info.value.code == 0
    assert "--toml" in capsys.readouterr().out


# ----------------------------------------------------------------------------------- import


def test_import_does_not_pull_torch():
    code = "import islet_imaging.stages, sys; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
