"""A study: the Snakemake workflow's grid of jobs, with one MLflow parent run per invocation.

- `config`: the checks of a study config (`conf/study/*.yaml`), run when Snakemake parses it;
- `targets`: the layout under `results` (which the report reads) and the grid expanded into the files the
  rules make;
- `parent_run`: the invocation's parent run (created before any job, ended with the report);
- `jobs`: one job, an app run as a child of the parent (`python -m moetuner.study job`);
- `recovery`: a clean start after a crash (stale lock, RUNNING children) and a refusal to start against a
  tracking server that is down;
- `cluster_check`: the checks of a study run on Slurm against the same study run locally;
- `__main__`: the command line the rules call (`job`, `finish`).
"""
