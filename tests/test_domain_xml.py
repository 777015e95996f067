from exporter.domain_xml import parse_disks

LIVE_XML = """
<domain type='kvm' id='3'>
  <name>web-1</name>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/img/top.qcow2' index='1'/>
      <backingStore type='file' index='2'>
        <format type='qcow2'/>
        <source file='/img/mid.qcow2'/>
        <backingStore type='file' index='3'>
          <format type='qcow2'/>
          <source file='/img/base.qcow2'/>
          <backingStore/>
        </backingStore>
      </backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/img/flat.raw' index='4'/>
      <backingStore/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <source protocol='rbd' name='pool/vol'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <target dev='sda' bus='sata'/>
    </disk>
  </devices>
</domain>
"""


def test_chain_depth_and_paths_from_live_xml():
    disks = {d.disk: d for d in parse_disks("web-1", LIVE_XML)}
    assert set(disks) == {"vda", "vdb", "vdc"}  # the cdrom cannot carry a block job
    vda = disks["vda"]
    assert vda.source == "/img/top.qcow2" and vda.format == "qcow2"
    assert [i.path for i in vda.backing_chain] == ["/img/mid.qcow2", "/img/base.qcow2"]
    assert vda.backing_depth == 2
    assert disks["vdb"].backing_depth == 0
    assert disks["vdc"].source == "rbd:pool/vol" and disks["vdc"].backing_depth == 0
