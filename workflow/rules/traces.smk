# Traces: tiny preset models extract routing from text; real routing shipped in data/ is copied, or
# imported from shared_data; synthetic traces. A re-split (`<trace>.split<seed>`, a grid's `split_seeds`) is its
# trace split again with another seed. A `loads` trace's split is its `of` trace's, the profile
# part turned into per-step expert loads (a load profile, as an engine dumps them).


rule build_model:
    output:
        directory(f"{RESULTS}/models/{{preset}}"),
    log:
        log_path("build_model", "{preset}"),
    benchmark:
        bench_path("build_model", "{preset}")
    conda:
        "../envs/moetuner.yaml"
    shell:
        f"python {PROJECT}/workflow/scripts/build_model.py {{wildcards.preset}} {{output}} > {{log}} 2>&1"


rule extract:
    input:
        model=extract_model,
    output:
        trace=trace_path("{trace}"),
    wildcard_constraints:
        trace=traces_of_kind("extract"),
    params:
        app=lambda w: app("extract", w),
        args=lambda w: overrides(TRACES[w.trace].get("args", [])),
    log:
        log_path("extract", "{trace}"),
    benchmark:
        bench_path("extract", "{trace}")
    conda:
        "../envs/moetuner.yaml"
    shell:
        "{params.app} moetuner-extract model={input.model} out={output.trace} {params.args} > {log} 2>&1"


rule import_trace:
    output:
        trace=trace_path("{trace}"),
    wildcard_constraints:
        trace=traces_of_kind("import"),
    params:
        app=lambda w: app("import_trace", w),
        path=lambda w: overrides([targets.real_data_path(TRACES[w.trace], SHARED)]),
        args=lambda w: overrides(TRACES[w.trace].get("args", [])),
    log:
        log_path("import_trace", "{trace}"),
    benchmark:
        bench_path("import_trace", "{trace}")
    conda:
        "../envs/moetuner.yaml"
    shell:
        "{params.app} moetuner-import path={params.path} out={output.trace} {params.args} > {log} 2>&1"


rule shipped_trace:
    input:
        shipped_trace_file,
    output:
        trace=trace_path("{trace}"),
    wildcard_constraints:
        trace=traces_of_kind("file"),
    log:
        log_path("shipped_trace", "{trace}"),
    benchmark:
        bench_path("shipped_trace", "{trace}")
    conda:
        "../envs/moetuner.yaml"
    shell:
        "cp {input} {output} > {log} 2>&1"


rule synth:
    output:
        trace=trace_path("{trace}"),
    wildcard_constraints:
        trace=traces_of_kind("synth"),
    params:
        app=lambda w: app("synth", w),
        args=lambda w: overrides(TRACES[w.trace].get("args", [])),
    log:
        log_path("synth", "{trace}"),
    benchmark:
        bench_path("synth", "{trace}")
    conda:
        "../envs/moetuner.yaml"
    shell:
        "{params.app} moetuner-synth out={output.trace} {params.args} > {log} 2>&1"


rule split:
    input:
        trace=lambda w: trace_path(targets.parse_split_variant(w.trace)[0]),
    output:
        profile=split_path("{trace}", "profile"),
        heldout=split_path("{trace}", "heldout"),
    wildcard_constraints:
        trace=f"{traces_of_kind(*targets.ROUTING_KINDS)}|{targets.one_of(RESPLITS)}",
    params:
        app=lambda w: app("split", w),
        args=lambda w: overrides(targets.split_args(config, w.trace)),
        out=lambda w, output: str(Path(output.profile).parent),
    log:
        log_path("split", "{trace}"),
    benchmark:
        bench_path("split", "{trace}")
    conda:
        "../envs/moetuner.yaml"
    shell:
        "{params.app} moetuner-split trace={input.trace} out={params.out} {params.args} > {log} 2>&1"


rule loads_split:
    input:
        profile=lambda w: split_path(TRACES[w.trace]["of"], "profile"),
        heldout=lambda w: split_path(TRACES[w.trace]["of"], "heldout"),
    output:
        profile=split_path("{trace}", "profile"),
        heldout=split_path("{trace}", "heldout"),
    wildcard_constraints:
        trace=traces_of_kind("loads"),
    params:
        app=lambda w: app("import_trace", w),
        args=lambda w: overrides(TRACES[w.trace].get("args", [])),
    log:
        log_path("loads_split", "{trace}"),
    benchmark:
        bench_path("loads_split", "{trace}")
    conda:
        "../envs/moetuner.yaml"
    shell:
        "{params.app} moetuner-import format=trace path={input.profile} out={output.profile} {params.args} "
        "> {log} 2>&1 && cp {input.heldout} {output.heldout}"
