"""The research tools live in the repository's ``benchmarks/``, outside the package: ``mirasol_ray`` never imports
them, a wheel ships none of them, and ``mirasol bench <tool>`` finds them in a checkout and says where they live
when it is not one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from mirasol_ray import cli

ROOT = Path(__file__).resolve().parents[2]
RESEARCH = ("learn", "recipe", "lucidrains")


def _imports_of_benchmarks(text: str, name: str) -> list[str]:
    """``name:line module`` of each absolute import of ``benchmarks`` or a module of it in ``text``."""
    found = []
    for node in ast.walk(ast.parse(text, name)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        found += [f"{name}:{node.lineno} {n}" for n in names if n == "benchmarks" or n.startswith("benchmarks.")]
    return found


def test_the_package_never_imports_the_research_tools():
    files = sorted((ROOT / "mirasol_ray").rglob("*.py"))
    assert len(files) > 20 and ROOT / "mirasol_ray" / "cli.py" in files
    assert [hit for f in files for hit in _imports_of_benchmarks(f.read_text(), str(f.relative_to(ROOT)))] == []


def test_the_scan_finds_an_import_of_the_research_tools():
    text = "import os, benchmarks.learn\nfrom benchmarks import recipe\nfrom .benchmarks import x\nimport benchmarking\n"
    assert _imports_of_benchmarks(text, "m.py") == ["m.py:1 benchmarks.learn", "m.py:2 benchmarks"]


def test_a_wheel_ships_the_package_without_the_research_tools():
    tomllib = pytest.importorskip("tomllib")
    from setuptools import find_packages

    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(where=str(ROOT), include=spec["include"], exclude=spec.get("exclude", ()))
    assert {"mirasol_ray", "mirasol_ray.bench", "mirasol_ray.data", "mirasol_ray.train"} <= set(packages)
    assert not [p for p in packages if p.split(".")[0] != "mirasol_ray"]
    assert (ROOT / "benchmarks" / "__init__.py").exists()  # it is there to leave out
    shipped = {p.relative_to(ROOT / "mirasol_ray").with_suffix("").as_posix()
               for p in (ROOT / "mirasol_ray").rglob("*.py")}
    assert not shipped & {"bench/learn", "bench/recipe", "data/bars_beeps", "bench/_lucidrains_runner"}


def test_the_checkout_is_found_beside_the_package(tmp_path):
    assert cli.benchmarks_dir() == ROOT / "benchmarks"
    # a wheel install: site-packages holds the package, no pyproject.toml, maybe another project's benchmarks/
    site = tmp_path / "site-packages"
    (site / "mirasol_ray").mkdir(parents=True)
    (site / "mirasol_ray" / "__init__.py").write_text("")
    assert cli.benchmarks_dir(str(site / "mirasol_ray" / "__init__.py")) is None
    (site / "benchmarks").mkdir()
    (site / "benchmarks" / "__init__.py").write_text("")
    assert cli.benchmarks_dir(str(site / "mirasol_ray" / "__init__.py")) is None


def test_in_a_checkout_bench_lists_and_runs_the_research_tools(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--help"])
    assert e.value.code == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in ("data", "model", "step", "train", "rows", *RESEARCH))
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "learn", "--help"])
    assert e.value.code == 0 and "--probe-encoder" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["learn", "--help"], ["recipe", "--out", "x", "--seed", "1"], ["lucidrains"]])
def test_outside_a_checkout_a_research_tool_says_where_it_lives_in_one_line(monkeypatch, capsys, argv):
    monkeypatch.setattr(cli, "benchmarks_dir", lambda package_file=None: None)
    assert cli.main(["bench", *argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and captured.out == "", captured
    assert f"mirasol bench {argv[0]} is a research tool" in lines[0] and "benchmarks/ folder" in lines[0]
    with pytest.raises(SystemExit) as e:  # and the product's own benchmarks are there as ever
        cli.main(["bench", "step", "--help"])
    assert e.value.code == 0
