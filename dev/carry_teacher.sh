#!/usr/bin/env bash
# The default teacher's GGUF (98 MB) onto a GPU machine whose calls carry 64 MiB each: two calls, the second
# within the ~30 s a warm machine keeps its files, then the study (or anything that needs the real teacher).
#
#   bash dev/carry_teacher.sh prepare      # here: dev/.carry1/ (part 1), dev/.carry2/ (part 2 + the gguf wheel)
#   device call 1:  command "bash dev/carry_teacher.sh stage1", carry ["dev/.carry1"]
#   device call 2, at once:
#       command "source dev/carry_teacher.sh stage2 && PHASE=build bash scripts/study_scale.sh ...",
#       carry ["dev/.carry2"]
# stage2 joins the parts into ~/t/teacher.gguf, checks its sha256 against the installed file's (written by
# prepare), installs the gguf wheel into /tmp/site and exports PYTHONPATH and TEACHER for what follows.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
case "${1:-}" in
  prepare)
    source dev/on_path.sh
    src=$("$PY" -c "from ar2mdm.shared.defaults import default_teacher; print(default_teacher())") || exit 1
    rm -rf dev/.carry1 dev/.carry2 && mkdir -p dev/.carry1 dev/.carry2
    split -b 50000000 -d -a 1 "$src" dev/.carry1/teacher.part
    mv dev/.carry1/teacher.part1 dev/.carry2/
    sha256sum "$src" | cut -d' ' -f1 > dev/.carry2/teacher.sha256
    "$PY" -m pip download -q --no-deps -d dev/.carry2 gguf==0.19.0 || exit 1
    grep -qxF "/dev/.carry1/" .gitignore && grep -qxF "/dev/.carry2/" .gitignore || echo "(add /dev/.carry1/ and /dev/.carry2/ to .gitignore)"
    du -sh dev/.carry1 dev/.carry2
    ;;
  stage1)
    mkdir -p ~/t && cp dev/.carry1/teacher.part0 ~/t/ && ls -la ~/t
    ;;
  stage2)
    cp dev/.carry2/teacher.part1 ~/t/ || { echo "carry_teacher: no ~/t/teacher.part0: call stage1 again, then this at once"; return 1 2>/dev/null || exit 1; }
    cat ~/t/teacher.part0 ~/t/teacher.part1 > ~/t/teacher.gguf
    if [[ $(sha256sum ~/t/teacher.gguf | cut -d' ' -f1) != $(cat dev/.carry2/teacher.sha256) ]]; then
      echo "carry_teacher: ~/t/teacher.gguf does not match its sha256"; return 1 2>/dev/null || exit 1
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site dev/.carry2/gguf-*.whl || { return 1 2>/dev/null || exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} TEACHER=$HOME/t/teacher.gguf
    echo "carry_teacher: TEACHER=$TEACHER (sha256 checked), gguf on PYTHONPATH"
    ;;
  *)
    echo "usage: bash dev/carry_teacher.sh prepare | stage1 | source dev/carry_teacher.sh stage2"; exit 2 ;;
esac
