complete -c sysgenidd -l runtime-dir -d 'Directory holding the socket (sysgenid.sock), the page (generation), the saved state and a lock. Default: /run/sysgenid, the system daemon\'s, which only root may use; any other uid must name its own directory (clients then need SYSGENID_RUNTIME_DIR=DIR)' -r -F
complete -c sysgenidd -l source -d 'Restore-signal sources: `auto` (every source whose device exists), `none`, or a comma-separated list of vmfork, vmclock, uevent. Privileged bump requests (`sysgenidctl bump`) are always accepted' -r
complete -c sysgenidd -l kmsg -d 'Kernel log device followed by the vmfork source (from its end). A FIFO or other stream (tests, benchmarks) is read from its start' -r -F
complete -c sysgenidd -l vmclock -d 'vmclock device read by the vmclock source' -r -F
complete -c sysgenidd -l coalesce-ms -d 'Signals from different sources within this window are one restore and cause one bump' -r
complete -c sysgenidd -l max-watchers -d 'Most watchers in total; further watchers are refused with EUSERS' -r
complete -c sysgenidd -l max-watchers-per-uid -d 'Most watchers per user id' -r
complete -c sysgenidd -l max-connections-per-uid -d 'Most socket connections per non-root user id (watchers or not); further connections get a clear error and are closed' -r
complete -c sysgenidd -l max-queued-bytes -d 'Bytes of unread replies all socket clients together may leave queued in the daemon; a client whose reply would pass it is dropped' -r
complete -c sysgenidd -l max-queued-bytes-per-uid -d 'Bytes of unread replies the socket clients of one non-root user id may leave queued in the daemon; a client whose reply would pass it is dropped' -r
complete -c sysgenidd -l hello-timeout-ms -d 'A client that connects must send its Hello within this time, or it gets an error and is dropped' -r
complete -c sysgenidd -l device -d 'Serve the seed\'s device ABI at PATH through FUSE (an empty regular file, created if missing and removed on exit), or `off`. Default: /dev/sysgenid when running as root and that path is free, else off' -r
complete -c sysgenidd -l device-group -d 'Members of this group may open the device for writing (read, acknowledge with write, poll, ioctl, mmap: the seed\'s full watcher); everyone else opens it read-only; forced updates still need CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE. A member can map the device page writable, so grant it only to trusted programs. `none`: write opens need those capabilities. Default: `sysgenid` when that group exists, else none' -r
complete -c sysgenidd -l hooks-dir -d 'Run every executable file in DIR, in name order, on each lifecycle event (`HOOK freeze|thaw|change`), or `off`. Default: /etc/sysgenid/hooks.d, if it exists' -r
complete -c sysgenidd -l hook-timeout-ms -d 'A hook still running after this long is killed (with its process group) and counted as timed out' -r
complete -c sysgenidd -l max-frozen-ms -d 'The longest the system stays frozen: after this the daemon thaws by itself and logs it, so an orchestrator that died between freeze and thaw cannot leave every program quiesced' -r
complete -c sysgenidd -l restore-thaw -d 'After a restore while frozen: `auto` thaws once every tracked watcher has acknowledged the new generation; `manual` leaves thawing to the orchestrator (or the freeze bound)' -r -f -a "auto\t''
manual\t''"
complete -c sysgenidd -l host-channel -d 'Serve the hypervisor host over vsock on PORT (off by default): one JSON request per line (docs/protocol.md, "The host channel"). Only the host (CID 2) is served; any other peer, such as a local process through vsock loopback, is refused and logged. The host may report a restore or clone (with entropy), freeze, thaw, wait for the watchers and read status: what a privileged local orchestrator may. `test-unix:PATH` serves the same protocol on a Unix socket whose every peer counts as the host: for tests only, never in production' -r
complete -c sysgenidd -l host-channel-idle-ms -d 'A host channel connection with no request in progress that sends nothing (or reads nothing) for this long is closed' -r
complete -c sysgenidd -l recover -d 'Continue from the generation shown in the page file when the saved state is missing or corrupt (the daemon refuses to start otherwise)'
complete -c sysgenidd -s h -l help -d 'Print help (see more with \'--help\')'
complete -c sysgenidd -s V -l version -d 'Print version'
