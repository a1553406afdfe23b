# Sourced by the scripts that lay out a working folder and empty it first (a mocked /opt/ml tree, a smoke-test
# folder). `fresh_run_dir DIR` empties and recreates DIR only when it is clearly one of ours: missing, empty, or
# marked by an earlier fresh_run_dir (or holding an earlier run's input/config/hyperparameters.json). Anything
# else (a path typed by mistake, $HOME, a folder of the user's) is refused, so nothing a user wrote is deleted.
RUN_DIR_MARK=.efficientnet-train-run

fresh_run_dir() {
    local dir
    dir=$(realpath -m "$1")
    if [[ "$dir" =~ ^/([^/]+)?$ || "$dir" =~ ^/home/[^/]+$ || "$dir" == "$HOME" || "$dir" == /opt/ml
          || "$dir" == /usr/* || "$dir" == /etc/* ]]; then
        echo "Refusing to empty $dir: choose a folder of its own for this run" >&2; return 2
    fi
    if [ -e "$dir" ] && { [ ! -d "$dir" ] || [ -L "$dir" ]; }; then
        echo "Refusing to empty $dir: it is not a plain folder" >&2; return 2
    fi
    if [ -d "$dir" ] && [ -n "$(ls -A "$dir")" ] && [ ! -f "$dir/$RUN_DIR_MARK" ] \
            && [ ! -f "$dir/input/config/hyperparameters.json" ]; then
        echo "Refusing to empty $dir: it holds files that no earlier run of this script made" >&2; return 2
    fi
    rm -rf -- "$dir"
    mkdir -p -- "$dir"
    : > "$dir/$RUN_DIR_MARK"
}
