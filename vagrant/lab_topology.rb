# Reads the lab's topology file (overlay/lab/default-topology.yaml, or
# $OVERLAY_LAB_TOPOLOGY) into the list of machines the Vagrantfile defines:
# ZooKeeper, one edge per network, then every host. Only what a VM needs
# (name, role, its addresses on each segment, memory) is read here; the
# Python side (`overlay lab config|script`, run inside each VM) writes the
# daemon configs and network set-up from the same file, so both labs stay
# one topology. Validation is Python's: provisioning fails on a bad file.
require "yaml"
require "ipaddr"

module LabTopology
  Nic = Struct.new(:segment, :ip, :netmask, keyword_init: true)
  Machine = Struct.new(:name, :role, :network, :nics, :memory, keyword_init: true)

  DEFAULT = File.expand_path("../overlay/lab/default-topology.yaml", __dir__)

  def self.path
    ENV.fetch("OVERLAY_LAB_TOPOLOGY", DEFAULT)
  end

  def self.load(path = self.path)
    YAML.safe_load(File.read(path), aliases: false) || {}
  end

  def self.netmask(cidr)
    IPAddr.new("255.255.255.255").mask(Integer(cidr.split("/")[1])).to_s
  end

  # Every machine of the lab, in the order `overlay lab` lists them.
  def self.machines(topo = load)
    vg = topo["vagrant"] || {}
    big = Integer(vg.fetch("memory", 1024))
    small = Integer(vg.fetch("small_memory", 512))
    inet = topo.fetch("internet").fetch("subnet")
    zk = topo.fetch("zookeeper")
    out = [Machine.new(name: zk.fetch("name", "zk"), role: "zookeeper", network: nil, memory: big,
                       nics: [Nic.new(segment: "inet", ip: zk.fetch("address"), netmask: netmask(inet))])]
    topo.fetch("networks").each do |net|
      mask = netmask(net.fetch("subnet"))
      edge = net.fetch("edge")
      out << Machine.new(name: "#{net.fetch('name')}-edge", role: "edge", network: net["name"], memory: small,
                         nics: [Nic.new(segment: net["name"], ip: edge.fetch("private"), netmask: mask),
                                Nic.new(segment: "inet", ip: edge.fetch("public"), netmask: netmask(inet))])
    end
    topo.fetch("networks").each do |net|
      mask = netmask(net.fetch("subnet"))
      net.fetch("hosts").each do |h|
        # an old-format host (neti: true) runs no daemon; the Vagrant lab starts no emulator on it
        member = h.fetch("member", !h.fetch("neti", false))
        out << Machine.new(name: h.fetch("name"), role: member ? "member" : "outsider", network: net["name"],
                           memory: member ? big : small,
                           nics: [Nic.new(segment: net["name"], ip: h.fetch("private"), netmask: mask)])
      end
    end
    out
  end
end
