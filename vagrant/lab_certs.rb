# The mutual-TLS certificates of the Vagrant lab's gRPC controller (docs/grpc.md).
#
# When a network of the topology has `registry: grpc`, its members' daemons
# reach the registry through `overlay controller` on the ZooKeeper VM. The
# certificates are made here, on the machine running Vagrant (with Ruby's
# OpenSSL: the VMs cannot hand files to each other), once, into Vagrant's
# local data directory (.vagrant/overlay-certs, or under
# $VAGRANT_DOTFILE_PATH), and uploaded by the Vagrantfile to each VM, which
# installs them into /etc/overlay/certs (provision.sh):
#
#   zk                 ca.crt, controller.crt/.key, operator.crt/.key
#   grpc members       ca.crt, <host>.crt/.key
#
# They follow `overlay certs` (overlay/controller/certs.py): ECDSA P-256 keys,
# the holder named in a URI subject alternative name urn:overlay:<role>:<name>
# (what the controller authorises on), the controller's certificate also
# naming localhost, 127.0.0.1 and the ZooKeeper VM's address.
# tests/unit/test_lab_topology.py checks them with the Python side (identities,
# a TLS handshake). Files that exist are kept; a new CA re-issues everything.
require "openssl"
require "fileutils"
require "ipaddr"

module LabCerts
  URN = "urn:overlay:"
  CA_DAYS = 3650
  LEAF_DAYS = 825

  # Vagrant's local data directory of this project (where the certificates live).
  def self.default_dir(vagrant_dir)
    dot = ENV["VAGRANT_DOTFILE_PATH"]
    base = dot && !dot.empty? ? File.expand_path(dot, vagrant_dir) : File.join(vagrant_dir, ".vagrant")
    File.join(base, "overlay-certs")
  end

  def self.grpc_members(topo)
    topo.fetch("networks").select { |n| n["registry"] == "grpc" }
        .flat_map { |n| n.fetch("hosts").select { |h| h.fetch("member", true) }.map { |h| h.fetch("name") } }
  end

  # Make what is missing in `dir`; returns {machine name => {file name => path}} for the uploads
  # (empty when no network uses the controller).
  def self.ensure(topo, dir)
    members = grpc_members(topo)
    return {} if members.empty?
    zk = topo.fetch("zookeeper")
    FileUtils.mkdir_p(dir, mode: 0o700)
    path = ->(f) { File.join(dir, f) }
    fresh = !(File.exist?(path["ca.crt"]) && File.exist?(path["ca.key"]))
    if fresh
      key, cert = make_ca
      write(path["ca.key"], key.to_pem, 0o600)
      write(path["ca.crt"], cert.to_pem, 0o644)
    end
    ca_key = OpenSSL::PKey.read(File.read(path["ca.key"]))
    ca_cert = OpenSSL::X509::Certificate.new(File.read(path["ca.crt"]))
    leaves = [["controller", "controller", ["localhost", "127.0.0.1", zk.fetch("address")]],
              ["operator", "operator", []]] + members.map { |m| [m, "node", []] }
    leaves.each do |file, role, names|
      next if !fresh && File.exist?(path["#{file}.crt"]) && File.exist?(path["#{file}.key"])
      key, cert = issue(ca_key, ca_cert, role, role == "node" ? file : role, names)
      write(path["#{file}.key"], key.to_pem, 0o600)
      write(path["#{file}.crt"], cert.to_pem, 0o644)
    end
    zk_files = %w[ca.crt controller.crt controller.key operator.crt operator.key]
    out = { zk.fetch("name", "zk") => zk_files.to_h { |f| [f, path[f]] } }
    members.each { |m| out[m] = ["ca.crt", "#{m}.crt", "#{m}.key"].to_h { |f| [f, path[f]] } }
    out
  end

  def self.write(file, data, mode)
    tmp = "#{file}.tmp#{Process.pid}"
    File.open(tmp, File::WRONLY | File::CREAT | File::TRUNC, mode) { |fh| fh.write(data) }
    File.rename(tmp, file)
  end

  def self.subject(role, cn)
    OpenSSL::X509::Name.new([["O", "overlay"], ["OU", role], ["CN", cn[0, 64]]])
  end

  def self.skeleton(subject, issuer, key, days)
    cert = OpenSSL::X509::Certificate.new
    cert.version = 2
    cert.serial = OpenSSL::BN.rand(120)
    cert.subject = subject
    cert.issuer = issuer
    cert.public_key = key
    now = Time.now
    cert.not_before = now - 300
    cert.not_after = now + days * 86_400
    cert
  end

  def self.make_ca
    key = OpenSSL::PKey::EC.generate("prime256v1")
    name = subject("ca", "overlay CA")
    cert = skeleton(name, name, key, CA_DAYS)
    ef = OpenSSL::X509::ExtensionFactory.new(cert, cert)
    cert.add_extension(ef.create_extension("basicConstraints", "CA:TRUE,pathlen:0", true))
    cert.add_extension(ef.create_extension("keyUsage", "keyCertSign,cRLSign,digitalSignature", true))
    cert.add_extension(ef.create_extension("subjectKeyIdentifier", "hash", false))
    cert.sign(key, OpenSSL::Digest.new("SHA256"))
    [key, cert]
  end

  def self.issue(ca_key, ca_cert, role, name, names)
    key = OpenSSL::PKey::EC.generate("prime256v1")
    cert = skeleton(subject(role, name), ca_cert.subject, key, LEAF_DAYS)
    cert.not_after = ca_cert.not_after if cert.not_after > ca_cert.not_after
    ef = OpenSSL::X509::ExtensionFactory.new(ca_cert, cert)
    alt = ["URI:#{URN}#{role}:#{name}"] + names.map { |n| (IPAddr.new(n) rescue nil) ? "IP:#{n}" : "DNS:#{n}" }
    usage = role == "controller" ? "serverAuth,clientAuth" : "clientAuth"
    cert.add_extension(ef.create_extension("basicConstraints", "CA:FALSE", true))
    cert.add_extension(ef.create_extension("keyUsage", "digitalSignature", true))
    cert.add_extension(ef.create_extension("extendedKeyUsage", usage, false))
    cert.add_extension(ef.create_extension("subjectAltName", alt.join(","), false))
    cert.add_extension(ef.create_extension("subjectKeyIdentifier", "hash", false))
    cert.add_extension(ef.create_extension("authorityKeyIdentifier", "keyid:always", false))
    cert.sign(ca_key, OpenSSL::Digest.new("SHA256"))
    [key, cert]
  end
end
