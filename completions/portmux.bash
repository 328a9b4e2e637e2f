# bash completion for portmux-server, portmux-client and portmux-ctl.
# Installed once per command name (bash-completion loads completions by name).

_portmux_server()
{
    local cur prev
    cur="${COMP_WORDS[COMP_CWORD]}"
    prev="${COMP_WORDS[COMP_CWORD-1]}"
    case "$prev" in
        --config|-config)
            COMPREPLY=($(compgen -f -- "$cur"))
            return ;;
        --log-level)
            COMPREPLY=($(compgen -W "debug info warn error" -- "$cur"))
            return ;;
    esac
    COMPREPLY=($(compgen -W "--config --log-level --help --version" -- "$cur"))
}

_portmux_client()
{
    local cur prev
    cur="${COMP_WORDS[COMP_CWORD]}"
    prev="${COMP_WORDS[COMP_CWORD-1]}"
    case "$prev" in
        --ca|--cert|--key)
            COMPREPLY=($(compgen -f -- "$cur"))
            return ;;
        -l|--log-level)
            COMPREPLY=($(compgen -W "debug info warn error" -- "$cur"))
            return ;;
        -s|--server|-t|--token|-n|--name|-a|--allow|--allow-nodes|--server-name|--heartbeat-interval|\
        --heartbeat-timeout|--connect-timeout|--max-pending-dials|--max-streams|--session-buffer-limit)
            return ;;
    esac
    COMPREPLY=($(compgen -W "--server --token --name --allow --allow-nodes --no-reconnect --tls --ca
        --server-name --cert --key --heartbeat-interval --heartbeat-timeout
        --connect-timeout --max-pending-dials --max-streams --session-buffer-limit --log-level --help
        --version" -- "$cur"))
}

_portmux_ctl()
{
    local cur prev i cmd="" verb=""
    cur="${COMP_WORDS[COMP_CWORD]}"
    prev="${COMP_WORDS[COMP_CWORD-1]}"
    # The command and its verb are the first two words that are not global options.
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${COMP_WORDS[i]}" in
            --api|--token|--timeout) ((i++)) ;;
            -*) ;;
            *) if [[ -z $cmd ]]; then cmd="${COMP_WORDS[i]}";
               elif [[ -z $verb ]]; then verb="${COMP_WORDS[i]}"; fi ;;
        esac
    done
    case "$prev" in
        --api|--token|--timeout|--port|--target-ip|--target-port|--client|--name|\
        --allow-from|--max-connections|--rate-limit|--grace)
            return ;;
        --proxy-protocol)
            COMPREPLY=($(compgen -W "none v1 v2" -- "$cur"))
            return ;;
    esac
    local fields="--port --target-ip --target-port --tunnel --direct --client --name
        --allow-from --allow-any --proxy-protocol --max-connections --rate-limit --enable
        --disable"
    case "$cmd" in
        "")
            COMPREPLY=($(compgen -W "mapping client health --api --token --json --timeout
                --help --version" -- "$cur")) ;;
        mapping)
            case "$verb" in
                "") COMPREPLY=($(compgen -W "add list update rm" -- "$cur")) ;;
                add|update) COMPREPLY=($(compgen -W "$fields" -- "$cur")) ;;
            esac ;;
        client)
            case "$verb" in
                "") COMPREPLY=($(compgen -W "add list rotate rm" -- "$cur")) ;;
                rotate) COMPREPLY=($(compgen -W "--grace" -- "$cur")) ;;
            esac ;;
    esac
}

complete -F _portmux_server portmux-server
complete -F _portmux_client portmux-client
complete -F _portmux_ctl portmux-ctl
