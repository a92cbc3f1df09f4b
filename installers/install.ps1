# Nebula Command agent installer for Windows (x86_64, aarch64). Run in an elevated PowerShell:
#
#   & ([scriptblock]::Create((irm https://CONTROLLER/install.ps1))) -Token TOKEN
#
# Downloads nebula-agent.exe from the controller, checks its SHA-256 against the one this script
# was served with and the one the controller publishes, installs it under Program Files, writes
# ProgramData\Nebula\agent.toml, joins the fleet with the token and registers the `nebula-agent`
# Windows service (automatic start, restarted on failure). Running it again upgrades the binary
# and keeps the node's identity. -Uninstall removes everything it installed.
#
# Windows PowerShell has no Ed25519: the signature is checked by the agent itself when it updates
# (self-update); here the checksum pinned in this script, served by the controller, is the check.
[CmdletBinding()]
param(
    [string]$Token = '',
    [string]$Url = '',
    [string]$Controller = '',
    [string]$Name = '',
    [string[]]$Label = @(),
    [switch]$AutoUpdate,
    [switch]$Uninstall
)
$ErrorActionPreference = 'Stop'
Set-StrictMode -Version 3

# @nebula-defaults-begin (the controller fills this block in when it serves the script)
$DefaultUrl = ''
$DefaultController = ''
$CaPin = ''
$ReleaseKeyHex = ''
$ExpectedSha256 = @{}
# @nebula-defaults-end

$ServiceName = 'nebula-agent'
$InstallDir = Join-Path $env:ProgramFiles 'Nebula'
$Bin = Join-Path $InstallDir 'nebula-agent.exe'
$DataDir = Join-Path $env:ProgramData 'Nebula'
$Conf = Join-Path $DataDir 'agent.toml'
$StateDir = Join-Path $DataDir 'state'

function Say([string]$Message) { Write-Host "nebula-agent: $Message" }
function Fail([string]$Message) { throw "nebula-agent: $Message" }

$principal = New-Object Security.Principal.WindowsPrincipal([Security.Principal.WindowsIdentity]::GetCurrent())
if (-not $principal.IsInRole([Security.Principal.WindowsBuiltInRole]::Administrator)) {
    Fail 'run this in an elevated PowerShell (Run as administrator)'
}

function Stop-Agent {
    $svc = Get-Service -Name $ServiceName -ErrorAction SilentlyContinue
    if ($null -ne $svc -and $svc.Status -ne 'Stopped') {
        Stop-Service -Name $ServiceName -Force
        $svc.WaitForStatus('Stopped', [TimeSpan]::FromSeconds(30))
    }
}

if ($Uninstall) {
    Stop-Agent
    if ($null -ne (Get-Service -Name $ServiceName -ErrorAction SilentlyContinue)) {
        & sc.exe delete $ServiceName | Out-Null
    }
    foreach ($path in @($InstallDir, $DataDir)) {
        if (Test-Path $path) { Remove-Item -Recurse -Force $path }
    }
    Say 'removed the agent, its configuration, identity and service'
    return
}

switch ($env:PROCESSOR_ARCHITECTURE) {
    'AMD64' { $Arch = 'x86_64' }
    'ARM64' { $Arch = 'aarch64' }
    default { Fail "unsupported CPU architecture $($env:PROCESSOR_ARCHITECTURE)" }
}
$File = "nebula-agent-windows-$Arch.exe"
if ($Url -eq '') { $Url = $DefaultUrl }
if ($Controller -eq '') { $Controller = $DefaultController }
if ($Url -eq '') { Fail 'no controller URL: pass -Url https://CONTROLLER' }
$Url = $Url.TrimEnd('/')

$tmp = Join-Path ([IO.Path]::GetTempPath()) ("nebula-" + [Guid]::NewGuid().ToString('N'))
New-Item -ItemType Directory -Path $tmp | Out-Null
try {
    Say "downloading $File from $Url"
    [Net.ServicePointManager]::SecurityProtocol = [Net.SecurityProtocolType]::Tls12
    $download = Join-Path $tmp $File
    Invoke-WebRequest -UseBasicParsing -Uri "$Url/downloads/$File" -OutFile $download
    $published = ((Invoke-WebRequest -UseBasicParsing -Uri "$Url/downloads/$File.sha256").Content -split '\s+')[0].ToLowerInvariant()
    $actual = (Get-FileHash -Algorithm SHA256 -Path $download).Hash.ToLowerInvariant()
    if ($actual -ne $published) {
        Fail "checksum mismatch: the download is $actual, the controller publishes $published; refusing to install"
    }
    if ($ExpectedSha256.ContainsKey($File) -and $actual -ne $ExpectedSha256[$File]) {
        Fail "checksum mismatch: the download is $actual, this script expects $($ExpectedSha256[$File]); refusing to install"
    }
    Say 'checksum verified'

    $upgrade = Test-Path (Join-Path $StateDir 'agent.json')
    if (-not $upgrade -and $Token -eq '') { Fail 'a join token is needed for a new install: -Token TOKEN' }
    if ($Token -ne '' -and $CaPin -ne '' -and -not $Token.EndsWith("@$CaPin")) {
        Fail 'this join token is for another controller (its CA pin differs)'
    }

    Stop-Agent
    New-Item -ItemType Directory -Force -Path $InstallDir, $DataDir, $StateDir | Out-Null
    # Only SYSTEM and Administrators may read the identity.
    & icacls.exe $DataDir /inheritance:r /grant:r 'SYSTEM:(OI)(CI)F' 'Administrators:(OI)(CI)F' | Out-Null
    Move-Item -Force -Path $download -Destination $Bin
    Say "installed $Bin"

    if (-not (Test-Path $Conf)) {
        if ($Controller -eq '') { Fail 'no controller address: pass -Controller HOST:PORT' }
        $toml = @(
            '# Written by install.ps1; edit freely (re-running the installer keeps this file).',
            "controller = `"$Controller`"",
            "state_dir = '$StateDir'",
            '',
            '[update]',
            "enabled = $(if ($AutoUpdate) { 'true' } else { 'false' })",
            "url = `"$Url`""
        )
        if ($ReleaseKeyHex -ne '') { $toml += "release_key = `"$ReleaseKeyHex`"" }
        Set-Content -Path $Conf -Value $toml -Encoding ascii
    }

    if ($upgrade) {
        Say "already enrolled; keeping this node's identity"
    } else {
        $tokenFile = Join-Path $tmp 'token'
        Set-Content -Path $tokenFile -Value $Token -Encoding ascii -NoNewline
        $joinArgs = @('--config', $Conf, 'join', '--token-file', $tokenFile, '--no-run')
        if ($Name -ne '') { $joinArgs += @('--name', $Name) }
        foreach ($l in $Label) { $joinArgs += @('--label', $l) }
        & $Bin @joinArgs
        if ($LASTEXITCODE -ne 0) { Fail 'joining the fleet failed' }
    }

    $binPath = "`"$Bin`" --config `"$Conf`" service"
    if ($null -eq (Get-Service -Name $ServiceName -ErrorAction SilentlyContinue)) {
        New-Service -Name $ServiceName -BinaryPathName $binPath -DisplayName 'Nebula Command agent' `
            -Description 'Joins the Nebula fleet over QUIC/mTLS' -StartupType Automatic | Out-Null
    } else {
        & sc.exe config $ServiceName binPath= $binPath start= auto | Out-Null
    }
    # Restart on failure (and on a non-zero exit, which is how a self-update restarts).
    & sc.exe failure $ServiceName reset= 86400 actions= restart/2000/restart/5000/restart/30000 | Out-Null
    & sc.exe failureflag $ServiceName 1 | Out-Null
    Start-Service -Name $ServiceName
    if ($upgrade) { Say 'upgraded and restarted' } else { Say 'installed, joined and started' }
} finally {
    Remove-Item -Recurse -Force $tmp -ErrorAction SilentlyContinue
}
