"""`vlmalign inspect`: a browsable, offline site of what the stages wrote, and judge-human agreement.

    runs.py       find and read the artifacts under the run folders given: make-prefs runs and ISR-DPO
                  iterations (samples, judgments, preferences), GRPO rollouts, eval outputs,
                  metrics.jsonl, stats.json and reports
    agreement.py  the blind annotation pairs, the annotation file, and judge-human agreement with a
                  Wilson score interval
    jsonfiles.py  the one reader of their JSON and JSONL files (one-line errors naming file and line)
    site.py       write the site: index.html, the packaged app (static/), the data as JS files and
                  a frame strip per video
    serve.py      `--serve PORT`: the site on localhost, writing annotations to a file
"""
