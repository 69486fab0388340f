# Sourced by the scripts that run on a GPU machine: where ar2mdm is not installed (such a machine runs a copy of
# the checkout under its own python3), put the source folders on PYTHONPATH as ar2mdm.* (the package-dir
# mapping of pyproject.toml, as symlinks). Needs PY and the checkout as the working folder.
if ! "$PY" -c "import ar2mdm.train" 2>/dev/null; then
  _root=$(mktemp -d)/root
  mkdir -p "$_root/ar2mdm"
  for _pkg in precompute train shared schemas; do ln -s "$PWD/$_pkg" "$_root/ar2mdm/$_pkg"; done
  export PYTHONPATH="$_root${PYTHONPATH:+:$PYTHONPATH}"
fi
