"""What a run records of its base: paths that load from any folder."""

from __future__ import annotations


def test_a_run_names_its_template_and_tools_files_by_absolute_path(tmp_path, monkeypatch):
    # lorafit_run.yaml is read by chat, eval and export from any folder
    from lorafit.config import build_config
    from lorafit.models.load import absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.jinja").write_text("{{ messages }}")
    (tmp_path / "tools.json").write_text("[]")
    (tmp_path / "chatml").write_text("a file named like a built-in template")
    for template, expected in (
        ("t.jinja", str(tmp_path / "t.jinja")),
        ("chatml", "chatml"),
        ("{{ x }}", "{{ x }}"),
    ):
        raw = {
            "model": {"name_or_path": "m"},
            "tokenizer": {"chat_template": template},
            "data": {"tools": "tools.json"},
        }
        cfg = absolute_paths(build_config(raw))
        assert cfg.tokenizer.chat_template == expected and cfg.data.tools == str(tmp_path / "tools.json")
