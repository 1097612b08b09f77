"""Run outputs and the report: the TensorBoard event-file writer (CRC-32C framing and the hand-encoded
Event protobuf, checked against known bytes and read back) and the figures/tables of
`experiments.report` on a synthetic set of job results covering every figure."""
import json
import os
import struct

import pytest

from experiments import report, runner, writers
from experiments.configs import quick


def test_crc32c_known_vectors():
  # RFC 3720 (iSCSI) test vectors for CRC-32C.
  assert writers.crc32c(b"123456789") == 0xE3069283
  assert writers.crc32c(bytes(32)) == 0x8A9136AA
  assert writers.crc32c(bytes([0xFF] * 32)) == 0x62A8AB43
  crc = writers.crc32c(b"abc")
  assert writers.masked_crc32c(b"abc") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_scalar_event_bytes_match_the_protobuf_wire_format():
  got = writers.encode_scalar_event(3, {"a": 2.0}, wall_time=1.0)
  value = b"\x0a\x01a" + b"\x15" + struct.pack("<f", 2.0)          # Value{tag=1, simple_value=2}
  summary = b"\x0a" + bytes([len(value)]) + value                   # Summary{repeated value=1}
  expected = (b"\x09" + struct.pack("<d", 1.0) + b"\x10\x03" +      # wall_time=1, step=2
              b"\x2a" + bytes([len(summary)]) + summary)            # summary=5
  assert got == expected


def test_event_file_round_trip(tmp_path):
  w = writers.EventWriter(str(tmp_path))
  w.scalars(0, {"train/loss": 1.5, "test/pred_error": 0.25})
  w.scalars(300, {"train/loss": 0.125, "skipped": float("nan")})
  w.scalars(2**40, {"x": -3.0})
  w.close()
  events = writers.read_events(w.path)
  assert events[0]["file_version"] == "brain.Event:2"
  assert [(e["step"], e["scalars"]) for e in events[1:]] == [
      (0, {"train/loss": 1.5, "test/pred_error": 0.25}), (300, {"train/loss": 0.125}), (2**40, {"x": -3.0})]
  data = bytearray(open(w.path, "rb").read())
  data[-5] ^= 1  # flip a bit in the last record's payload
  open(w.path, "wb").write(bytes(data))
  with pytest.raises(ValueError, match="bad data CRC"):
    writers.read_records(w.path)


def test_jsonl_truncates_steps_a_resumed_run_recomputes(tmp_path):
  path = str(tmp_path / "m.jsonl")
  w = writers.JsonlWriter(path)
  for step in (10, 20, 30):
    w.write({"step": step})
  w.close()
  with open(path, "a") as f:
    f.write('{"step": 4')  # a line cut short by a kill
  w = writers.JsonlWriter(path, truncate_after_step=20)
  w.write({"step": 30, "again": True})
  w.close()
  assert writers.read_jsonl(path) == [{"step": 10}, {"step": 20}, {"step": 30, "again": True}]


def _stats(v, n=2):
  return {"mean": v, "std": 0.1 * v, "per_seed": [v * 0.9, v * 1.1][:n]}


def _job(method, err, *, support=None, readout=None, K=None, curve=True, fixed=None):
  out = {"job": runner.Job(method, support=support, readout=readout, num_layers=K).name, "method": method,
         "support": support, "readout": readout, "num_layers": K,
         "family": "tf" if method in runner.TF_METHODS else "lista", "steps": 100, "seeds": [0, 1],
         "pred_error": _stats(err), "pred_error_median": _stats(err / 2),
         "pred_error_ci95": [_stats(err * 0.8), _stats(err * 1.3)],
         "per_prompt_length": {str(n): _stats(err * 10 / n) for n in (2, 4, 6, 8, 10, 15, 20)}}
  if method in report.FIXED_N_MARK:  # weights shaped for N rows: no other prompt length (runner)
    del out["per_prompt_length"]
  if method == "gpt2":  # positions for N + 1 = 11 points only: lengths beyond N are not evaluated
    out["per_prompt_length"] = {n: v for n, v in out["per_prompt_length"].items() if int(n) <= 10}
    out["per_prompt_length_skipped"] = [15, 20]
    out["per_prompt_length_note"] = "its learned position table holds max_points = 11 points"
  if fixed is not None:
    out["pred_error_fixed_x"] = _stats(fixed)
  if K is not None:
    out["constructed_tf_pred_error"] = _stats(err)
  if curve:
    out["curve"] = [{"step": s, "epoch": s / 10, "test_pred_error": err * (1 + 10 / s),
                     "test_pred_error_per_seed": [err, err * 1.2]} for s in (10, 20, 30)]
  return out


def test_report_writes_every_figure_and_table(tmp_path):
  c = quick.get_config()
  os.makedirs(tmp_path / "run")
  wd = tmp_path / "run"
  writers.write_json(str(wd / "config.json"), json.loads(c.to_json()))
  jobs = [_job("lista", 6.0, fixed=0.05), _job("lista_cp", 9.0, fixed=0.04), _job("alista", 12.0, fixed=0.06),
          _job("lista_meta", 3.1), _job("lista_cp_meta", 2.9), _job("lista_vm", 0.68),
          _job("small_tf", 0.3, readout="query"), _job("gpt2", 0.2),
          _job("lista_vm", 0.7, support=10), _job("lista_vm_ss", 0.07, support=10),
          _job("small_tf", 0.06, support=10, readout="query"),
          _job("small_tf", 0.5, readout="linear"), _job("small_tf", 0.31, readout="query_dagger")]
  jobs += [_job("lista_vm", 2.0 / k, K=k) for k in (1, 2, 4, 8, 16)]
  for j in jobs:
    os.makedirs(wd / j["job"])
    writers.write_json(str(wd / j["job"] / "results.json"), j)
  refs = {"ista": 1.2, "ista_median": 0.4, "ista_ci95": [1.0, 1.5], "fista": 0.9, "lasso": 0.5, "oracle": 0.01, "lam": 0.1, "iters": 12,
          "ista_per_k": {str(k): 2.0 / k ** 0.5 for k in (1, 2, 4, 8, 16)},
          "fista_per_k": {str(k): 1.5 / k for k in (1, 2, 4, 8, 16)},
          "ista_per_layer": [2.0 / k for k in range(1, 13)], "fista_per_layer": [1.5 / k for k in range(1, 13)],
          **{f"{m}_per_prompt_length": {str(n): 5.0 / n for n in (2, 4, 6, 8, 10, 15, 20)} for m in ("ista", "fista", "lasso")}}
  writers.write_json(str(wd / "results.json"), {"references": {"none": refs, "support10": {**refs, "lasso": 0.25}},
                                                 "classical_table": "| lam | ISTA |\n|---|---|\n| 0.1 | 1.2 |"})
  figures, md = report.report([str(wd)], str(tmp_path / "out"))
  names = {os.path.basename(f) for f in figures}
  assert names == {"fig1a.png", "fig1b.png", "fig1c.png", "fig2.png", "fig3.png", "layers.png", "per_layer.png",
                   "prompt_length.png", "prompt_length_support10.png", "transformer_training.png"}
  for f in figures:
    assert os.path.getsize(f) > 1000 and open(f, "rb").read(4) == b"\x89PNG"
  text = open(md).read()
  assert "| LISTA-VM-SS | 0.07 ± 0.007 |" in text          # mean ± std over seeds
  assert "| ISTA (lam=0.1) | 2 | 1 | 0.667 |" in text        # per-layer curve of the references
  # varying X (mean, bootstrap interval, median), training X
  assert "| LISTA | 6 ± 0.6 | [4.8, 7.8] | 3 ± 0.3 | 0.05 ± 0.005 |" in text
  assert "| ISTA (K=12, lam=0.1) | 1.2 | [1, 1.5] | 0.4 | | |" in text
  assert "| LASSO (converged) | 0.5 |  |  | | |" in text    # no interval stored (older runs): blank
  assert "| 16 | 0.125 | 0.125 | 0.5 | 0.09375 |" in text    # layers table row
  assert "| 0.1 | 1.2 |" in text                             # classical table carried over
  # Prompt lengths beyond the training N = 10 (quick preset): marked, GPT-2's missing ones explained.
  assert "| method | n=2 | n=4 | n=6 | n=8 | n=10 | n=15 | n=20 |" in text
  assert "| GPT-2 | 1 | 0.5 | 0.333 | 0.25 | 0.2 |  |  |" in text
  assert "GPT-2: n = 15, 20 left blank; its learned position table holds max_points = 11 points." in text
  assert text.count("Columns n > N = 10 lie beyond the training prompt length") == 3  # 2 x prompt length, fig1c
  # Figure 1a's setting over n: LISTA / LISTA-CP / ALISTA (weights for N rows) at n = N only, on
  # varying X and on their training X; Figure 1b's setting has its own table of its own jobs.
  assert "### Figure 1a setting (S = 3): error vs prompt length (trained at N = 10)" in text
  assert "| LISTA (n = N only) |  |  |  |  | 6 |  |  |" in text
  assert "| LISTA on its training X |  |  |  |  | 0.05 |  |  |" in text
  assert "| LISTA (meta) (n = N only) |  |  |  |  | 3.1 |  |  |" in text
  assert "| LISTA-VM | 3.4 | 1.7 | 1.13 | 0.85 | 0.68 | 0.453 | 0.34 |" in text
  sec_a = text[text.index("### Figure 1a setting"):]
  sec_a = sec_a[:sec_a.index("![](")]
  assert sec_a.count("| LISTA-VM |") == 1                  # not the depth-study jobs (lista_vm-K*)
  assert sec_a.count("| Small TF |") == 1 and "| Small TF | 1.5 |" in sec_a   # the preset's read-out only
  bars_b = text[text.index("### Figure 1b: S = 3"):]
  assert "| LASSO (converged) | 0.25 |" in bars_b[:bars_b.index("![](")]      # Figure 1b's own references
  sec = text[text.index("### Figure 1b setting (S = 3, support in first 10): error vs prompt length"):]
  sec = sec[:sec.index("![](")]
  assert "| LISTA-VM-SS | 0.35 | 0.175 |" in sec and "| LISTA-VM | 3.5 |" in sec and "| ISTA | 2.5 |" in sec
  assert "| LISTA-VM | 3.4 |" not in sec and "GPT-2" not in sec and "n = N only" not in sec
  # Every trained Transformer job's evaluations during training, one column each (LISTA jobs not).
  assert ("| step | gpt2 | small_tf-linear | small_tf-query | small_tf-query_dagger | small_tf-support10-query |"
          in text)
  assert "| 10 | 0.4 | 1 | 0.6 | 0.62 | 0.12 |" in text and "| 30 | 0.2667 | 0.6667 | 0.4 | 0.4133 | 0.08 |" in text
  for name in names:
    assert f"]({name})" in text


def test_transformer_training_table_subsamples_and_aligns_steps(tmp_path):
  # 25 evaluations: 11 rows shown, the first and last kept; a job that stopped early leaves blanks.
  c = quick.get_config()
  c.studies = "fig1c"
  run = {"config": json.loads(c.to_json()), "jobs": {
      "small_tf-linear": {"family": "tf", "curve": [{"step": 100 * i, "test_pred_error": 1.0 / i} for i in range(1, 26)]},
      "small_tf-query": {"family": "tf", "curve": [{"step": 100 * i, "test_pred_error": 2.0} for i in range(1, 6)]},
      "lista_vm": {"family": "lista", "curve": [{"step": 100 * i, "test_pred_error": 3.0} for i in range(1, 26)]}}}
  path, table = report.transformer_training(run, str(tmp_path))
  assert os.path.exists(path)
  rows = [r for r in table if r.startswith("| ") and not r.startswith("| step")]
  assert len(rows) == report.TRAINING_TABLE_ROWS
  assert rows[0] == "| 100 | 1 | 2 |" and rows[-1] == "| 2500 | 0.04 |  |"
  assert table[0] == "### Transformer training: test error vs step"
  assert "11 of 25 evaluations shown" in table[2] and "lista_vm" not in "".join(table)
  run["jobs"] = {"lista_vm": run["jobs"]["lista_vm"]}
  assert report.transformer_training(run, str(tmp_path)) is None


def test_report_cli_errors_on_a_non_run_directory(tmp_path, capsys):
  assert report.main([str(tmp_path)]) == 2
  assert "has no config.json" in capsys.readouterr().err


def test_report_titles_skipped_oracle_and_runs_with_one_folder_name(tmp_path):
  # S in the Figure 1a/1b titles comes from the run (it was always "S = 3"); a left-out oracle
  # is noted; two runs whose folders share a name get one figure folder each (they overwrote).
  dirs = []
  for parent, s, err in (("a", 2, 0.7), ("b", 3, 99.0)):
    c = quick.get_config()
    c.studies, c.fig1a.methods, c.problem.s = "fig1a", "lista_vm", s
    wd = tmp_path / parent / "run"
    os.makedirs(wd / "lista_vm")
    writers.write_json(str(wd / "config.json"), json.loads(c.to_json()))
    writers.write_json(str(wd / "lista_vm" / "results.json"), _job("lista_vm", err))
    writers.write_json(str(wd / "results.json"), {"studies": ["fig1a"], "references": {"none": {
        "ista": 1.2, "lam": 0.1, "iters": 12, "oracle_skipped": "C(20, 3) = 1,140 supports per task, over 10"}}})
    dirs.append(str(wd))
  figures, md = report.report(dirs, str(tmp_path / "out"))
  text = open(md).read()
  assert "### Figure 1a: S = 2" in text and "### Figure 1a: S = 3" in text
  assert text.count("| oracle | left out: C(20, 3) = 1,140 supports per task, over 10 |") == 2
  figs = sorted(os.path.relpath(f, tmp_path / "out") for f in figures if f.endswith("fig1a.png"))
  assert figs == ["run-2/fig1a.png", "run/fig1a.png"]
  assert "](run/fig1a.png)" in text and "](run-2/fig1a.png)" in text


def test_prompt_length_edges_and_unfinished_jobs(tmp_path):
  # Lengths up to N only: no "beyond N" note; N itself not among the lengths: the n = N marks
  # still get their column. An unfinished job shows its last logged step.
  for lengths, beyond in (("2,4,10", False), ("2,4", False), ("2,4,15", True)):
    c = quick.get_config()
    c.studies, c.fig1a.methods, c.eval.prompt_lengths = "fig1a", "lista,lista_vm", lengths
    wd = tmp_path / lengths.replace(",", "_")
    os.makedirs(wd / "lista"), os.makedirs(wd / "lista_vm")
    writers.write_json(str(wd / "config.json"), json.loads(c.to_json()))
    for j in (_job("lista", 6.0), _job("lista_vm", 0.7)):
      if j["method"] == "lista_vm":
        j["per_prompt_length"] = {n: _stats(1.0) for n in lengths.split(",")}
      writers.write_json(str(wd / j["job"] / "results.json"), j)
    os.makedirs(wd / "ghost" / "checkpoints")
    (wd / "ghost" / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train_loss": 0.5}) + "\n"
                                                        for s in (10, 30)))
    _, md = report.report([str(wd)], str(wd / "out"))
    text = open(md).read()
    assert ("Columns n > N = 10 lie beyond" in text) == beyond
    ns = sorted({int(n) for n in lengths.split(",")} | {10})
    assert "| method | " + " | ".join(f"n={n}" for n in ns) + " |" in text
    assert "| LISTA (n = N only) | " + " | ".join("6" if n == 10 else "" for n in ns) + " |" in text
    assert "| ghost | 30 | 0.5 | - |" in text
