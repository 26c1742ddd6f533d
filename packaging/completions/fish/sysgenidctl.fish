# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_sysgenidctl_global_optspecs
    string join \n runtime-dir= h/help V/version
end

function __fish_sysgenidctl_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_sysgenidctl_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_sysgenidctl_using_subcommand
    set -l cmd (__fish_sysgenidctl_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c sysgenidctl -n "__fish_sysgenidctl_needs_command" -l runtime-dir -d 'The daemon\'s runtime directory (socket and page). Default: /run/sysgenid, the system daemon\'s, for every user. A per-user daemon\'s directory is used only when named here or in SYSGENID_RUNTIME_DIR, and only if that daemon runs as root or as the caller' -r -F
complete -c sysgenidctl -n "__fish_sysgenidctl_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c sysgenidctl -n "__fish_sysgenidctl_needs_command" -s V -l version -d 'Print version'
complete -c sysgenidctl -n "__fish_sysgenidctl_needs_command" -f -a "get" -d 'Print the current generation'
complete -c sysgenidctl -n "__fish_sysgenidctl_needs_command" -f -a "watch" -d 'Register a watcher; on each change print the new generation (one per line), run CMD if given with SYSGENID_GENERATION and SYSGENID_KIND (clone, restore or unknown: the kind of that change, as status reports it; unknown if another change came first) set, then acknowledge'
complete -c sysgenidctl -n "__fish_sysgenidctl_needs_command" -f -a "freeze" -d 'Freeze every lifecycle participant before a snapshot (as root). Exit 0 once frozen; 3 if not frozen within the timeout (the freeze is then aborted and everything thawed); 4 if not privileged'
complete -c sysgenidctl -n "__fish_sysgenidctl_needs_command" -f -a "thaw" -d 'Thaw after a snapshot (as root). Exit 0, also when not frozen; 4 if not privileged'
complete -c sysgenidctl -n "__fish_sysgenidctl_needs_command" -f -a "bump" -d 'Force a new generation: max(MIN, current + 1). Needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE (root). Prints the new generation'
complete -c sysgenidctl -n "__fish_sysgenidctl_needs_command" -f -a "wait-watchers" -d 'Wait until no tracked watcher is outdated'
complete -c sysgenidctl -n "__fish_sysgenidctl_needs_command" -f -a "status" -d 'Show the generation, watchers, sources and last change'
complete -c sysgenidctl -n "__fish_sysgenidctl_needs_command" -f -a "hooks" -d 'List the shipped hooks (machine-id, ssh-host-keys, hostname, network, clock) and the enabled ones; enable or disable a shipped hook (as root)'
complete -c sysgenidctl -n "__fish_sysgenidctl_needs_command" -f -a "criu-hook" -d 'CRIU\'s action script for a container running its own sysgenidd (run by /usr/libexec/sysgenid/criu-action; see docs/containers.md)'
complete -c sysgenidctl -n "__fish_sysgenidctl_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand get" -l runtime-dir -d 'The daemon\'s runtime directory (socket and page). Default: /run/sysgenid, the system daemon\'s, for every user. A per-user daemon\'s directory is used only when named here or in SYSGENID_RUNTIME_DIR, and only if that daemon runs as root or as the caller' -r -F
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand get" -s h -l help -d 'Print help'
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand watch" -l count -d 'Exit after N changes (with --lifecycle: N events; default: run until killed)' -r
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand watch" -l exec -d 'Command (and arguments) to run on each change (each event with --lifecycle) before acknowledging (confirming)' -r
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand watch" -l runtime-dir -d 'The daemon\'s runtime directory (socket and page). Default: /run/sysgenid, the system daemon\'s, for every user. A per-user daemon\'s directory is used only when named here or in SYSGENID_RUNTIME_DIR, and only if that daemon runs as root or as the caller' -r -F
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand watch" -l untracked -d 'Do not hold up wait-watchers (nor, with --lifecycle, a freeze)'
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand watch" -l lifecycle -d 'Take part in the snapshot lifecycle: be told to freeze and thaw'
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand watch" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand freeze" -l timeout-ms -d 'Give up after MS milliseconds (default and 0: 30000)' -r
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand freeze" -l runtime-dir -d 'The daemon\'s runtime directory (socket and page). Default: /run/sysgenid, the system daemon\'s, for every user. A per-user daemon\'s directory is used only when named here or in SYSGENID_RUNTIME_DIR, and only if that daemon runs as root or as the caller' -r -F
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand freeze" -s h -l help -d 'Print help'
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand thaw" -l runtime-dir -d 'The daemon\'s runtime directory (socket and page). Default: /run/sysgenid, the system daemon\'s, for every user. A per-user daemon\'s directory is used only when named here or in SYSGENID_RUNTIME_DIR, and only if that daemon runs as root or as the caller' -r -F
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand thaw" -s h -l help -d 'Print help'
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand bump" -l min -d 'The minimum value for the new generation' -r
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand bump" -l entropy-file -d 'Entropy to mix into the kernel\'s pool (credited) before the daemon reseeds it and draws the new epoch: 32 to 512 bytes read from FILE, `-` for stdin (for example 64 bytes of the host\'s own getrandom, sent along by an orchestrator). Anything else is refused (exit 2) and nothing changes' -r -F
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand bump" -l kind -d 'What this change is: `clone` (one of possibly several copies of a snapshot: hooks renew machine identity), `restore` (the same machine put back in time: identity is kept) or `unknown`. Hooks and `watch --exec` get it as SYSGENID_KIND' -r
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand bump" -l hostname -d 'The hostname this change should give the machine, exported to the hooks as SYSGENID_HOSTNAME for this change (a valid hostname of at most 64 bytes)' -r
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand bump" -l runtime-dir -d 'The daemon\'s runtime directory (socket and page). Default: /run/sysgenid, the system daemon\'s, for every user. A per-user daemon\'s directory is used only when named here or in SYSGENID_RUNTIME_DIR, and only if that daemon runs as root or as the caller' -r -F
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand bump" -l allow-exhaustion -d 'Accept a MIN in the counter\'s last 2^20 values (ends the mechanism for good if MIN is 4294967295)'
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand bump" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand wait-watchers" -l timeout-ms -d 'Give up after MS milliseconds (exit 3); 0 waits forever' -r
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand wait-watchers" -l runtime-dir -d 'The daemon\'s runtime directory (socket and page). Default: /run/sysgenid, the system daemon\'s, for every user. A per-user daemon\'s directory is used only when named here or in SYSGENID_RUNTIME_DIR, and only if that daemon runs as root or as the caller' -r -F
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand wait-watchers" -s h -l help -d 'Print help'
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand status" -l runtime-dir -d 'The daemon\'s runtime directory (socket and page). Default: /run/sysgenid, the system daemon\'s, for every user. A per-user daemon\'s directory is used only when named here or in SYSGENID_RUNTIME_DIR, and only if that daemon runs as root or as the caller' -r -F
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand status" -l json -d 'Machine-readable JSON'
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand status" -s h -l help -d 'Print help'
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand hooks; and not __fish_seen_subcommand_from list enable disable help" -l shipped-dir -d 'Where the package installs its hooks' -r -F
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand hooks; and not __fish_seen_subcommand_from list enable disable help" -l hooks-dir -d 'The daemon\'s hooks directory (sysgenidd --hooks-dir)' -r -F
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand hooks; and not __fish_seen_subcommand_from list enable disable help" -l runtime-dir -d 'The daemon\'s runtime directory (socket and page). Default: /run/sysgenid, the system daemon\'s, for every user. A per-user daemon\'s directory is used only when named here or in SYSGENID_RUNTIME_DIR, and only if that daemon runs as root or as the caller' -r -F
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand hooks; and not __fish_seen_subcommand_from list enable disable help" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand hooks; and not __fish_seen_subcommand_from list enable disable help" -f -a "list" -d 'List the shipped hooks, whether each is enabled (and as which link), and the other hooks in the hooks directory'
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand hooks; and not __fish_seen_subcommand_from list enable disable help" -f -a "enable" -d 'Link a shipped hook into the hooks directory (as root). Enabling one that is enabled changes nothing'
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand hooks; and not __fish_seen_subcommand_from list enable disable help" -f -a "disable" -d 'Remove the links to a shipped hook from the hooks directory (as root). Disabling one that is not enabled changes nothing'
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand hooks; and not __fish_seen_subcommand_from list enable disable help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand hooks; and __fish_seen_subcommand_from list" -l shipped-dir -d 'Where the package installs its hooks' -r -F
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand hooks; and __fish_seen_subcommand_from list" -l hooks-dir -d 'The daemon\'s hooks directory (sysgenidd --hooks-dir)' -r -F
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand hooks; and __fish_seen_subcommand_from list" -l runtime-dir -d 'The daemon\'s runtime directory (socket and page). Default: /run/sysgenid, the system daemon\'s, for every user. A per-user daemon\'s directory is used only when named here or in SYSGENID_RUNTIME_DIR, and only if that daemon runs as root or as the caller' -r -F
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand hooks; and __fish_seen_subcommand_from list" -s h -l help -d 'Print help'
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand hooks; and __fish_seen_subcommand_from enable" -l shipped-dir -d 'Where the package installs its hooks' -r -F
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand hooks; and __fish_seen_subcommand_from enable" -l hooks-dir -d 'The daemon\'s hooks directory (sysgenidd --hooks-dir)' -r -F
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand hooks; and __fish_seen_subcommand_from enable" -l runtime-dir -d 'The daemon\'s runtime directory (socket and page). Default: /run/sysgenid, the system daemon\'s, for every user. A per-user daemon\'s directory is used only when named here or in SYSGENID_RUNTIME_DIR, and only if that daemon runs as root or as the caller' -r -F
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand hooks; and __fish_seen_subcommand_from enable" -s h -l help -d 'Print help'
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand hooks; and __fish_seen_subcommand_from disable" -l shipped-dir -d 'Where the package installs its hooks' -r -F
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand hooks; and __fish_seen_subcommand_from disable" -l hooks-dir -d 'The daemon\'s hooks directory (sysgenidd --hooks-dir)' -r -F
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand hooks; and __fish_seen_subcommand_from disable" -l runtime-dir -d 'The daemon\'s runtime directory (socket and page). Default: /run/sysgenid, the system daemon\'s, for every user. A per-user daemon\'s directory is used only when named here or in SYSGENID_RUNTIME_DIR, and only if that daemon runs as root or as the caller' -r -F
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand hooks; and __fish_seen_subcommand_from disable" -s h -l help -d 'Print help'
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand hooks; and __fish_seen_subcommand_from help" -f -a "list" -d 'List the shipped hooks, whether each is enabled (and as which link), and the other hooks in the hooks directory'
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand hooks; and __fish_seen_subcommand_from help" -f -a "enable" -d 'Link a shipped hook into the hooks directory (as root). Enabling one that is enabled changes nothing'
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand hooks; and __fish_seen_subcommand_from help" -f -a "disable" -d 'Remove the links to a shipped hook from the hooks directory (as root). Disabling one that is not enabled changes nothing'
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand hooks; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand criu-hook" -l inside -d 'Internal: the step run inside the container\'s pid namespace' -r
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand criu-hook" -l action -d 'Internal: the CRIU action, for messages' -r
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand criu-hook" -l timeout-ms -d 'Internal: the freeze timeout' -r
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand criu-hook" -l deadline-ms -d 'Internal: when the inside step gives up' -r
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand criu-hook" -l runtime-dir -d 'The daemon\'s runtime directory (socket and page). Default: /run/sysgenid, the system daemon\'s, for every user. A per-user daemon\'s directory is used only when named here or in SYSGENID_RUNTIME_DIR, and only if that daemon runs as root or as the caller' -r -F
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand criu-hook" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand help; and not __fish_seen_subcommand_from get watch freeze thaw bump wait-watchers status hooks criu-hook help" -f -a "get" -d 'Print the current generation'
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand help; and not __fish_seen_subcommand_from get watch freeze thaw bump wait-watchers status hooks criu-hook help" -f -a "watch" -d 'Register a watcher; on each change print the new generation (one per line), run CMD if given with SYSGENID_GENERATION and SYSGENID_KIND (clone, restore or unknown: the kind of that change, as status reports it; unknown if another change came first) set, then acknowledge'
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand help; and not __fish_seen_subcommand_from get watch freeze thaw bump wait-watchers status hooks criu-hook help" -f -a "freeze" -d 'Freeze every lifecycle participant before a snapshot (as root). Exit 0 once frozen; 3 if not frozen within the timeout (the freeze is then aborted and everything thawed); 4 if not privileged'
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand help; and not __fish_seen_subcommand_from get watch freeze thaw bump wait-watchers status hooks criu-hook help" -f -a "thaw" -d 'Thaw after a snapshot (as root). Exit 0, also when not frozen; 4 if not privileged'
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand help; and not __fish_seen_subcommand_from get watch freeze thaw bump wait-watchers status hooks criu-hook help" -f -a "bump" -d 'Force a new generation: max(MIN, current + 1). Needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE (root). Prints the new generation'
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand help; and not __fish_seen_subcommand_from get watch freeze thaw bump wait-watchers status hooks criu-hook help" -f -a "wait-watchers" -d 'Wait until no tracked watcher is outdated'
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand help; and not __fish_seen_subcommand_from get watch freeze thaw bump wait-watchers status hooks criu-hook help" -f -a "status" -d 'Show the generation, watchers, sources and last change'
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand help; and not __fish_seen_subcommand_from get watch freeze thaw bump wait-watchers status hooks criu-hook help" -f -a "hooks" -d 'List the shipped hooks (machine-id, ssh-host-keys, hostname, network, clock) and the enabled ones; enable or disable a shipped hook (as root)'
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand help; and not __fish_seen_subcommand_from get watch freeze thaw bump wait-watchers status hooks criu-hook help" -f -a "criu-hook" -d 'CRIU\'s action script for a container running its own sysgenidd (run by /usr/libexec/sysgenid/criu-action; see docs/containers.md)'
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand help; and not __fish_seen_subcommand_from get watch freeze thaw bump wait-watchers status hooks criu-hook help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand help; and __fish_seen_subcommand_from hooks" -f -a "list" -d 'List the shipped hooks, whether each is enabled (and as which link), and the other hooks in the hooks directory'
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand help; and __fish_seen_subcommand_from hooks" -f -a "enable" -d 'Link a shipped hook into the hooks directory (as root). Enabling one that is enabled changes nothing'
complete -c sysgenidctl -n "__fish_sysgenidctl_using_subcommand help; and __fish_seen_subcommand_from hooks" -f -a "disable" -d 'Remove the links to a shipped hook from the hooks directory (as root). Disabling one that is not enabled changes nothing'
