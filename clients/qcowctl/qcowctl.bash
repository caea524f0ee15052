# bash completion for qcowctl: commands, their second words (snapshot create, ...),
# options, and image names (asked of the server named by --url or $QCOWD_URL).
_qcowctl_images()
{
    local url=() i
    for ((i = 1; i < COMP_CWORD; i++)); do
        [[ ${COMP_WORDS[i]} == --url && -n ${COMP_WORDS[i + 1]} ]] && url=(--url "${COMP_WORDS[i + 1]}")
    done
    # the list is printed indented by two per level: an image's own keys are at four
    # (snapshots and bitmaps have names too, deeper)
    timeout 2 qcowctl "${url[@]}" list 2>/dev/null | sed -n 's/^    "name": "\([^"]*\)",\{0,1\}$/\1/p'
}

_qcowctl()
{
    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD - 1]}
    local commands="list info create rm size read write zero discard flush extents features upload download
        snapshot bitmap commit convert check jobs job wait events ticket health whoami metrics help"
    local global="--url --token --cacert --output --help --version"
    case $prev in
    --url | --token | --base | --snapshot | --granularity | --cluster-size | --refcount-bits | --count | \
        --last-event-id | --timeout | --source-image | --image)
        [[ $prev == --base || $prev == --source-image || $prev == --image ]] &&
            COMPREPLY=($(compgen -W "$(_qcowctl_images)" -- "$cur"))
        return
        ;;
    --cacert) COMPREPLY=($(compgen -f -- "$cur")); return ;;
    --output) COMPREPLY=($(compgen -W "json text" -- "$cur")); return ;;
    --repair) COMPREPLY=($(compgen -W "leaks all" -- "$cur")); return ;;
    --status) COMPREPLY=($(compgen -W "created running paused aborting concluded" -- "$cur")); return ;;
    --compression-type) COMPREPLY=($(compgen -W "zlib zstd" -- "$cur")); return ;;
    --backing) COMPREPLY=($(compgen -W "flatten keep $(_qcowctl_images)" -- "$cur")); return ;;
    --compat) COMPREPLY=($(compgen -W "v2 v3" -- "$cur")); return ;;
    --preallocation) COMPREPLY=($(compgen -W "off metadata" -- "$cur")); return ;;
    --ops) COMPREPLY=($(compgen -W "read write read,write" -- "$cur")); return ;;
    esac
    # the command: the first word that is neither an option nor an option's value
    local i cmd="" sub="" ncmd=0
    for ((i = 1; i < COMP_CWORD; i++)); do
        local w=${COMP_WORDS[i]}
        case $w in
        --url | --token | --cacert | --output) ((i++)); continue ;;
        -*) continue ;;
        esac
        if [[ -z $cmd ]]; then
            cmd=$w
        elif [[ -z $sub ]]; then
            sub=$w
        fi
        ((ncmd++))
    done
    if [[ -z $cmd ]]; then
        if [[ $cur == -* ]]; then
            COMPREPLY=($(compgen -W "$global" -- "$cur"))
        else
            COMPREPLY=($(compgen -W "$commands" -- "$cur"))
        fi
        return
    fi
    local verbs=""
    case $cmd in
    snapshot) verbs="list create delete revert read" ;;
    bitmap) verbs="list info add remove clear enable disable merge" ;;
    job) verbs="pause resume cancel dismiss" ;;
    ticket) verbs="list create revoke" ;;
    help) COMPREPLY=($(compgen -W "$commands" -- "$cur")); return ;;
    esac
    if [[ -n $verbs && $ncmd -eq 1 ]]; then
        COMPREPLY=($(compgen -W "$verbs" -- "$cur"))
        return
    fi
    if [[ $cur == -* ]]; then
        local opts="--help --output"
        local what=$cmd
        [[ -n $verbs ]] && what+=" $sub"
        case $what in
        create) opts+=" --cluster-size --backing --extended-l2 --lazy-refcounts --compression-type --refcount-bits
            --compat --preallocation" ;;
        write | zero | discard) opts+=" --no-flush" ;;
        extents) opts+=" --bitmap" ;;
        "snapshot create" | "snapshot delete" | "snapshot revert") opts+=" --wait" ;;
        "bitmap add") opts+=" --granularity --disabled" ;;
        "bitmap merge") opts+=" --source-image" ;;
        commit*) opts+=" --base --force --wait" ;;
        convert*) opts+=" --snapshot --compress --compression-type --backing --cluster-size --extended-l2
            --refcount-bits --wait" ;;
        check*) opts+=" --repair --wait" ;;
        jobs) opts+=" --image --status" ;;
        events) opts+=" --count --last-event-id" ;;
        "ticket create") opts+=" --ops --timeout" ;;
        esac
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
        return
    fi
    # operands typed so far: an image name comes first for most commands
    local n=$((ncmd - 1)) what=$cmd
    if [[ -n $verbs ]]; then
        n=$((n - 1))
        what+=" $sub"
    fi
    case $what in
    list | jobs | job* | wait | events | health | whoami | metrics | "ticket list" | "ticket revoke") ;;
    upload) ((n == 1)) && COMPREPLY=($(compgen -f -- "$cur")) ;;
    download) ((n == 1)) && COMPREPLY=($(compgen -f -- "$cur")) ;&
    *) ((n == 0)) && COMPREPLY=($(compgen -W "$(_qcowctl_images)" -- "$cur")) ;;
    esac
    return 0
}
complete -F _qcowctl qcowctl
