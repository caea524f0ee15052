# timing.sh: helpers the benchmark scripts source.
#   timed CMD...   prints the seconds CMD took (its stdout is dropped)
#   min BEST NEW   prints the smaller of two second counts (BEST may be empty)
timed() {
    local s e
    s=$(date +%s.%N); "$@" >/dev/null; e=$(date +%s.%N)
    echo "$e - $s" | bc -l
}
min() { if [ -z "$1" ] || [ "$(echo "$2 < $1" | bc -l)" = 1 ]; then echo "$2"; else echo "$1"; fi; }
