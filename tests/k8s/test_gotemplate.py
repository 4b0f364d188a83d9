"""The Go-template subset that renders the chart in the tests behaves like Go's text/template + sprig."""

from __future__ import annotations

import pytest
from gotemplate import Renderer, TemplateError


def render(text: str, **values) -> str:
    return Renderer({"Values": values, "Release": {"Name": "r", "Namespace": "ns"}}).render(text)


def test_trim_markers_and_conditionals():
    text = "a:\n  {{- if .Values.on }}\n  b: {{ .Values.b | quote }}\n  {{- else }}\n  c: 1\n  {{- end }}\n"
    assert render(text, on=True, b="x") == 'a:\n  b: "x"\n'
    assert render(text, on=False) == "a:\n  c: 1\n"


def test_range_with_variables_include_and_pipelines():
    text = ('{{- define "item" }}- {{ .k }}={{ .v }}{{ end -}}\n'
            '{{- range $k, $v := .Values.m }}\n{{ include "item" (dict "k" $k "v" $v) }}{{ end }}\n'
            '{{ toYaml .Values.l | nindent 2 }}\n{{ $x := "a" }}{{ if true }}{{ $x = "b" }}{{ end }}{{ $x }}')
    assert render(text, m={"z": 1, "a": 2}, l=[1]) == "\n- a=2\n- z=1\n\n  - 1\nb"


def test_missing_values_render_empty_and_defaults_apply():
    assert render("[{{ .Values.nope }}][{{ .Values.nope | default 3 }}][{{ .Values.s | default 3 }}]", s="") == \
        "[][3][3]"


def test_outside_the_subset_fails_loudly():
    with pytest.raises(TemplateError, match="tpl"):
        render('{{ tpl "x" . }}')
    with pytest.raises(TemplateError, match="end"):
        render("{{ if .Values.a }}never closed")
    with pytest.raises(TemplateError, match="required: give me x"):
        render('{{ required "give me x" .Values.x }}')
