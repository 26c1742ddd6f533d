/* SPDX-License-Identifier: Apache-2.0 OR MIT */
/*
 * sysgenid-device.h: the ioctl numbers of /dev/sysgenid, identical to the
 * seed's <linux/sysgenid.h> (v4 patch), for programs that use the device
 * served by sysgenidd through FUSE (see docs/device.md).
 *
 *   open()   every handle is a watcher of the system generation
 *   read()   u32 generation; blocks while up to date (O_NONBLOCK: EAGAIN;
 *            a signal: EINTR); buffer < 4 bytes: EINVAL
 *   write()  exactly 4 bytes: acknowledge that generation (else EINVAL)
 *   poll()   EPOLLIN while this handle is outdated
 *   mmap()   PROT_READ, MAP_SHARED, one page: bytes 0..3 are the generation
 *   close()  releases the watcher
 *
 * The device is a regular file (S_IFREG) on a FUSE mount, not a character
 * device: test for it with open(), not with S_ISCHR().
 */
#ifndef SYSGENID_DEVICE_H
#define SYSGENID_DEVICE_H

#include <linux/ioctl.h>

#define SYSGENID_DEVICE_PATH "/dev/sysgenid"

#define SYSGENID_IOCTL 0x2d
/* Returns the number of watchers (tracked handles) not yet acknowledging
 * the current generation. */
#define SYSGENID_GET_OUTDATED_WATCHERS _IO(SYSGENID_IOCTL, 1)
/* arg: timeout in milliseconds, 0 = none. Returns 0 when no watcher is
 * outdated; -1/EINTR when the caller's own handle is or becomes outdated
 * (handle it, acknowledge, retry) or on a signal; -1/ETIMEDOUT on timeout. */
#define SYSGENID_WAIT_WATCHERS _IO(SYSGENID_IOCTL, 2)
/* arg: minimum generation. Needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE
 * (else -1/EACCES); -1/EOVERFLOW past UINT32_MAX. */
#define SYSGENID_FORCE_GEN_UPDATE _IO(SYSGENID_IOCTL, 3)

#endif /* SYSGENID_DEVICE_H */
