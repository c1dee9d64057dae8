#!/bin/sh
# Nested VFIO run (issue #9 item 5): a TCG guest (L1: q35, intel-iommu, edu)
# plays the host. Its initrd carries kiln-shim, Debian's QEMU, virtiofsd and
# vhost-device-vsock; kiln-shim binds L1's edu to vfio-pci, passes it to an
# inner VM (L2, the kiln minimal image) and restores the driver afterwards.
#
# Usage: host-shim/tests/nested_vfio.sh MANIFEST KILN_SHIM [WORKDIR]
#   MANIFEST   the x86_64 minimal image's manifest.json (cargo xtask build-image)
#   KILN_SHIM  the kiln-shim binary to run inside L1
# Prints L1's console, then lines "nested: ..." with timings, and exits 0 when
# L1 reported NESTED-VFIO-DONE (run succeeded, edu unbound from vfio-pci). Slow (TCG inside TCG): see host-shim/tests/nested_vfio.rs.
set -eu

manifest=$1
shim=$2
work=${3:-$(mktemp -d /tmp/kiln-nested.XXXXXX)}
timeout_s=${KILN_NESTED_TIMEOUT:-1200}
img=$(dirname "$manifest")
kernel=$img/vmlinuz
root=$work/root
rm -rf "$root"
mkdir -p "$root"/bin "$root"/usr/bin "$root"/usr/share "$root"/l2 "$root"/bb/bin \
    "$root"/proc "$root"/sys "$root"/dev "$root"/tmp "$root"/run "$root"/etc

# A binary and its shared libraries, at the same paths as on this host.
copy_with_libs() {
    dest=$1
    src=$2
    mkdir -p "$root$(dirname "$dest")"
    cp -L "$src" "$root$dest"
    ldd "$src" 2>/dev/null | awk '/=> \//{print $3} /^\t\/.*ld-linux/{print $1}' | while read -r lib; do
        [ -e "$root$lib" ] && continue
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
}

cp /bin/busybox "$root/bin/busybox"
cp /bin/busybox "$root/bb/bin/busybox"
for a in $(/bin/busybox --list); do
    [ "$a" = busybox ] || ln -sf busybox "$root/bb/bin/$a"
done
echo 'root:x:0:0:root:/:/bin/sh' >"$root/bb/etc_passwd"
mkdir -p "$root/bb/etc" && mv "$root/bb/etc_passwd" "$root/bb/etc/passwd"

qemu=$(command -v qemu-system-x86_64)
copy_with_libs /usr/bin/qemu-system-x86_64 "$qemu"
qmod=/usr/lib/x86_64-linux-gnu/qemu
mkdir -p "$root$qmod"
cp "$qmod/accel-tcg-x86_64.so" "$root$qmod/"
# Firmware: QEMU's default data dir (/usr/share/qemu) with its seabios links.
cp -a /usr/share/seabios "$root/usr/share/"
mkdir -p "$root/usr/share/qemu"
for f in bios-256k.bin linuxboot_dma.bin linuxboot.bin kvmvapic.bin multiboot_dma.bin \
    pvh.bin vgabios-stdvga.bin efi-virtio.rom efi-e1000e.rom; do
    if [ -e "/usr/share/qemu/$f" ]; then cp -a "/usr/share/qemu/$f" "$root/usr/share/qemu/"; fi
done
copy_with_libs /usr/bin/kiln-shim "$shim"
strip --strip-debug "$root/usr/bin/kiln-shim" 2>/dev/null || true
copy_with_libs /usr/bin/virtiofsd "$(command -v virtiofsd || echo "$HOME/.cargo/bin/virtiofsd")"
copy_with_libs /usr/bin/vhost-device-vsock \
    "$(command -v vhost-device-vsock || echo "$HOME/.cargo/bin/vhost-device-vsock")"
# The L2 image: the files its manifest names (the shim checks their sha256).
cp "$img/manifest.json" "$img/vmlinuz" "$img/initrd.img" "$img/kiln-agent" \
    "$img/kernel.config" "$img/rootfs.img" "$root/l2/"

cat >"$root/etc/kiln.toml" <<'EOF'
[hypervisor.qemu]
path = "/usr/bin/qemu-system-x86_64"
accel = "tcg"
virtio_fs_daemon = "/usr/bin/virtiofsd-logged"
[agent]
# L2 (TCG in TCG) answered 62-86 s after its QEMU started in the runs that
# worked; when the agent is never reached (see nested_vfio.rs) fail in
# bounded time, with the shim's last connection error.
boot_timeout = 600
rpc_timeout = 120
[vsock]
backend = "/usr/bin/vhost-device-vsock"
EOF

# virtiofsd with its log kept outside the shim's run directory (removed at exit).
cat >"$root/usr/bin/virtiofsd-logged" <<'EOF'
#!/bin/sh
echo "virtiofsd $*" >>/tmp/virtiofsd-wrapper.log
exec /usr/bin/virtiofsd "$@" --log-level info 2>>/tmp/virtiofsd-wrapper.log
EOF
chmod +x "$root/usr/bin/virtiofsd-logged"

cat >"$root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/bin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
up() { cut -d' ' -f1 /proc/uptime; }
echo "nested: L1 init at uptime $(up) s"
bdf=
for d in /sys/bus/pci/devices/*; do
    if [ "$(cat $d/vendor)" = 0x1234 ] && [ "$(cat $d/device)" = 0x11e8 ]; then bdf=${d##*/}; fi
done
echo "nested: edu at $bdf, iommu group $(basename $(readlink /sys/bus/pci/devices/$bdf/iommu_group)), driver before: $(basename "$(readlink /sys/bus/pci/devices/$bdf/driver)" 2>/dev/null)"
# Progress: the inner VM's console and the helpers' logs (kiln-shim keeps
# them in its run directory), new lines every 20 s.
(
    mkdir -p /tmp/seen
    while sleep 20; do
        for f in /run/vm-*/*.log /tmp/virtiofsd-wrapper.log; do
            [ -f "$f" ] || continue
            b=$(basename "$f")
            n=$(cat "/tmp/seen/$b" 2>/dev/null || echo 0)
            m=$(wc -l <"$f")
            tag=L2; [ "$b" = console.log ] || tag="L1 $b"
            # vhost-device-vsock warns for every CONNECT held before the
            # guest's driver is up: counted, not shown.
            [ "$m" -gt "$n" ] && sed -n "$((n + 1)),${m}p" "$f" |
                grep -v 'before vring initialization' | sed "s/^/$tag: /"
            v=$(grep -c 'before vring initialization' "$f")
            [ "$v" -gt 0 ] && [ "$m" -gt "$n" ] && echo "$tag: $v 'backend event before vring initialization' warnings so far"
            echo "$m" >"/tmp/seen/$b"
        done
    done
) &
mon=$!
t0=$(up)
# stdin must not be the console: tokio's stdin reader cannot be cancelled
# and would keep the shim's runtime from shutting down.
KILN_RUN_DIR=/run kiln-shim --config /etc/kiln.toml run --image /l2/manifest.json --rootfs /bb \
    --device vfio:$bdf -e PCIDEVICE_TEST=$bdf \
    -- sh -c 'ls -l /dev/vfio; echo "PCI=$PCIDEVICE_TEST"' </dev/null 2>&1
rc=$?
t1=$(up)
kill $mon
echo "nested: kiln-shim run exit status $rc, uptime $t0 -> $t1 s"
drv=$(readlink /sys/bus/pci/devices/$bdf/driver)
ovr=$(cat /sys/bus/pci/devices/$bdf/driver_override)
echo "nested: driver after: '${drv##*/}' driver_override: '$ovr'"
ls -l /dev/vfio
[ $rc = 0 ] || { echo "== virtiofsd log (tail)"; tail -n 40 /tmp/virtiofsd-wrapper.log; }
if [ $rc = 0 ] && [ "${drv##*/}" != vfio-pci ] && { [ "$ovr" = "(null)" ] || [ -z "$ovr" ]; }; then
    echo "NESTED-VFIO-DONE restored"
else
    echo "NESTED-VFIO-FAIL"
fi
poweroff -f
EOF
chmod +x "$root/init"

(cd "$root" && find . | cpio -o -H newc --quiet) >"$work/l1.cpio"
echo "nested: L1 initrd $(du -h "$work/l1.cpio" | cut -f1) in $work"

start=$(date +%s)
timeout "$timeout_s" qemu-system-x86_64 -machine q35 -m 3G -smp 2 -accel tcg,thread=multi \
    -cpu max -nodefaults -no-user-config -display none -no-reboot \
    -device intel-iommu,caching-mode=on -device edu -serial stdio \
    -kernel "$kernel" -initrd "$work/l1.cpio" \
    -append "console=ttyS0 intel_iommu=on vfio_iommu_type1.allow_unsafe_interrupts=1 rdinit=/init panic=-1" \
    </dev/null | tee "$work/l1.log" | while IFS= read -r line; do
    printf '[%5ds] %s\n' $(($(date +%s) - start)) "$line"
done
echo "nested: L1 total $(($(date +%s) - start)) s"
grep -q NESTED-VFIO-DONE "$work/l1.log" && grep -q 'PCI=' "$work/l1.log"
