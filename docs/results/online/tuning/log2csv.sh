#!/bin/bash
# the benchmark's per-replay log lines as CSV: stream,seed,overhead_ms,policy,total_time_s,experts_moved,delay_steps
echo "stream,seed,overhead_ms,policy,total_time_s,experts_moved,delay_steps"
grep -h " ms .*: .* s, .* moved, delay " "$@" | sed -E 's/^([a-z_]+) [^ ]+ [^ ]+ seed ([0-9]+) overhead ([0-9.]+) ms ([^:]+): ([0-9.]+) s, ([0-9]+) moved, delay ([0-9]+) steps.*/\1,\2,\3,"\4",\5,\6,\7/'
