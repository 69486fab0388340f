#!/usr/bin/env bash
# The default teacher's GGUF (98 MB) onto a GPU machine whose calls carry 64 MiB each: two calls, the second
# within the ~30 s a warm machine keeps its files, then the study (or anything that needs the real teacher).
#
#   bash scripts/carry_teacher.sh prepare      # here: .carry1/ (part 1), .carry2/ (part 2 + the gguf wheel)
#   device call 1:  command "bash scripts/carry_teacher.sh stage1", carry [".carry1"]
#   device call 2, at once:
#       command "source scripts/carry_teacher.sh stage2 && PHASE=build bash scripts/study_scale.sh ...",
#       carry [".carry2"]
# stage2 joins the parts into ~/t/teacher.gguf, checks its sha256 against the installed file's (written by
# prepare), installs the gguf wheel into /tmp/site and exports PYTHONPATH and TEACHER for what follows.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
case "${1:-}" in
  prepare)
    source scripts/on_path.sh
    src=$("$PY" -c "from ar2mdm.shared.defaults import default_teacher; print(default_teacher())") || exit 1
    rm -rf .carry1 .carry2 && mkdir -p .carry1 .carry2
    split -b 50000000 -d -a 1 "$src" .carry1/teacher.part
    mv .carry1/teacher.part1 .carry2/
    sha256sum "$src" | cut -d' ' -f1 > .carry2/teacher.sha256
    "$PY" -m pip download -q --no-deps -d .carry2 gguf==0.19.0 || exit 1
    grep -qxF "/.carry1/" .gitignore && grep -qxF "/.carry2/" .gitignore || echo "(add /.carry1/ and /.carry2/ to .gitignore)"
    du -sh .carry1 .carry2
    ;;
  stage1)
    mkdir -p ~/t && cp .carry1/teacher.part0 ~/t/ && ls -la ~/t
    ;;
  stage2)
    cp .carry2/teacher.part1 ~/t/ || { echo "carry_teacher: no ~/t/teacher.part0: call stage1 again, then this at once"; return 1 2>/dev/null || exit 1; }
    cat ~/t/teacher.part0 ~/t/teacher.part1 > ~/t/teacher.gguf
    if [[ $(sha256sum ~/t/teacher.gguf | cut -d' ' -f1) != $(cat .carry2/teacher.sha256) ]]; then
      echo "carry_teacher: ~/t/teacher.gguf does not match its sha256"; return 1 2>/dev/null || exit 1
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry2/gguf-*.whl || { return 1 2>/dev/null || exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} TEACHER=$HOME/t/teacher.gguf
    echo "carry_teacher: TEACHER=$TEACHER (sha256 checked), gguf on PYTHONPATH"
    ;;
  *)
    echo "usage: bash scripts/carry_teacher.sh prepare | stage1 | source scripts/carry_teacher.sh stage2"; exit 2 ;;
esac
